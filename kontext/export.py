"""Export a trained model as files other people and tools can load.

    python -m kontext.export source=outputs/train/default out=exports/shapes diffusers=true
    python -m kontext.export source=exports/shapes out=exports/styled lora=style.safetensors lora_scale=0.8

`source` is a run directory, a flow-stage Lightning checkpoint (a file or an FSDP folder) or an
export folder, read by :mod:`kontext.artifact`. The export folder holds:

- `transformer.safetensors`: the EMA transformer in the reference (BFL) key layout, which
  the reference FLUX code and our `load_flux` read; its FluxParams are in the file metadata;
- `ae.safetensors`: the autoencoder in the reference layout (with its params and scale/shift);
- `config.json`: model and autoencoder params, the text encoder (kind, identity, build
  config) and the sampler defaults, including an explicit timestep list for a distilled student;
- with `diffusers=true`, `transformer/`: the same transformer as a diffusers
  `FluxTransformer2DModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
  keys converted by :mod:`kontext.formats.diffusers_format`).

With `lora=` (a file or a list, see `kontext.formats.lora_files`) the adapters are merged into the
transformer first, each scaled by `lora_scale` (one number, or one per file): the export is
the merged model, which loads anywhere without adapter support.

Everything is written into a temporary folder beside `out` and renamed into place at the
end, so a failed export never leaves a half-written folder. A sharded (FSDP) checkpoint, or a
run whose newest checkpoint is one, is never gathered: both transformer files are written from
it tensor by tensor (:mod:`kontext.formats.stream_export`; not with `lora=`, which merges in memory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from kontext.artifact import EXPORT_FORMAT, Artifact, sharded_artifact
from kontext.errors import KontextError
from kontext.pipeline import KontextPipeline

EXPORT_VERSION = 1
USAGE = """usage: python -m kontext.export source=RUN_DIR|CKPT|EXPORT out=FOLDER [diffusers=false] [overwrite=false]
                                 [lora=FILE|[FILES]] [lora_scale=1.0|[SCALES]]
  source      run directory, flow-stage .ckpt or export folder
  out         folder to write (must not exist unless overwrite=true)
  diffusers   also write a diffusers FluxTransformer2DModel folder under out/transformer
  lora        LoRA adapter file(s) to merge into the transformer first
  lora_scale  their strength: one number, or one per file"""


def text_config(pipe: KontextPipeline) -> dict:
    """How to rebuild the pipeline's text encoder: the loader's record, else what the encoder knows."""
    if pipe.text_config:
        return {k: v for k, v in pipe.text_config.items() if k != "_target_"}
    text = pipe.text
    config = {"kind": text.kind, "max_length": int(text.max_length)}
    if hasattr(text, "dtype"):
        config["dtype"] = str(text.dtype).removeprefix("torch.")
    return config


def export_config(pipe: KontextPipeline) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": asdict(pipe.model.params),
        "autoencoder": asdict(pipe.autoencoder.current_params()),
        "text": {"kind": pipe.text.kind, "identity": pipe.text.identity, "config": text_config(pipe)},
        "sampler": pipe.sampler.to_dict(),
        "source": pipe.source,
    }


def write_diffusers_transformer(model, folder: Path, sharded: Artifact | None = None) -> Path:
    """A diffusers `FluxTransformer2DModel` folder for `model` (a `Flux`), or, given `sharded`
    (`kontext.artifact.sharded_artifact`), for its EMA weights, streamed tensor by tensor."""
    from kontext.formats.diffusers_format import bfl_to_diffusers, diffusers_config
    from kontext.formats.stream_export import stream_transformer
    from kontext.formats.weights import save_safetensors

    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        config = diffusers_config(model.params)
        if sharded is None:
            sd = bfl_to_diffusers(model.state_dict(), model.params)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            stream_transformer(sharded, weights, diffusers=True, metadata={"format": "pt"})
    except (ValueError, KeyError) as err:
        raise KontextError(f"cannot export to diffusers: {err}") from err
    try:
        import diffusers

        config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        config["_diffusers_version"] = "0.32.0"
    if sharded is None:
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(sd, weights, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def export(source: str | os.PathLike | KontextPipeline, out_dir: str | os.PathLike, diffusers: bool = False,
           overwrite: bool = False, lora=None, lora_scale=1.0) -> Path:
    """Write the export folder `out_dir` (see the module docstring) and return its path. With
    `lora`, a pipeline given as `source` gets the adapters merged into its own model."""
    from kontext.formats.loading import read_parts
    from kontext.formats.lora_files import apply_adapters, read_adapters
    from kontext.formats.stream_export import stream_transformer
    from kontext.latent.autoencoder import save_autoencoder
    from kontext.network.model import flux_metadata, save_flux

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite:
        raise KontextError(f"{out_dir} already exists (pass overwrite=true to replace it)")
    loras = read_adapters(lora, lora_scale)
    sharded = None if isinstance(source, KontextPipeline) or loras else sharded_artifact(source)
    # A sharded source: the pipeline's transformer is on the meta device, its files are streamed.
    pipe = source if isinstance(source, KontextPipeline) else \
        KontextPipeline.from_parts(read_parts(source, weights=sharded is None))
    if loras:
        apply_adapters(pipe.model, loras)
        pipe.source = f"{pipe.source} + LoRA {', '.join(f'{p} x{s:g}' for p, _, s in loras)}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        version = {"kontext.export_version": str(EXPORT_VERSION)}
        if sharded is None:
            save_flux(pipe.model, tmp / "transformer.safetensors", metadata=version)
        else:
            stream_transformer(sharded, tmp / "transformer.safetensors", metadata=flux_metadata(sharded.params, version))
        save_autoencoder(pipe.autoencoder, tmp / "ae.safetensors")
        (tmp / "config.json").write_text(json.dumps(export_config(pipe), indent=2) + "\n")
        if diffusers:
            write_diffusers_transformer(pipe.model, tmp / "transformer", sharded)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        if out_dir.exists():  # overwrite: move the old folder aside first, drop it after the rename
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str]) -> None:
    from kontext.cli import parse_args

    args = parse_args(argv, {"source": "???", "out": "???", "diffusers": False, "overwrite": False, "lora": None,
                             "lora_scale": None}, USAGE)
    out = export(str(args["source"]), str(args["out"]), diffusers=bool(args["diffusers"]),
                 overwrite=bool(args["overwrite"]), lora=args["lora"],
                 lora_scale=1.0 if args["lora_scale"] is None else args["lora_scale"])
    print(f"exported {args['source']} to {out}")


if __name__ == "__main__":
    from kontext.cli import run_main

    run_main(main)
