"""Feature cache: real Shapes-Edit shards -> tiny random autoencoder + embedded MiniLM -> cache
shards -> the real loader in feature mode; features equal a fresh encoding; stale, damaged and
half-written caches are refused or never appear."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kontext.data import shapes_edit
from kontext.data.cache import (
    CacheError,
    StaleCacheError,
    bucket_resolution,
    build_cache,
    cache_identity,
    open_cache,
    prepare_cache,
)
from kontext.data.stream import StreamConfig, WorkerStream
from kontext.data.writers import write_shapes_edit
from kontext.latent.autoencoder import AutoEncoder, AutoEncoderParams
from kontext.latent.text import build_text_encoder

N = 20
S = 32  # canvas size: small images keep the autoencoder cheap


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and stay fast when other processes share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_ae(seed: int = 0, scale: float = 0.5) -> AutoEncoder:
    torch.manual_seed(seed)
    params = AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
                               num_res_blocks=1, z_channels=16, scale_factor=scale, shift_factor=0.1)
    return AutoEncoder(params).eval()


@pytest.fixture(scope="module")
def text():
    return build_text_encoder("embedded")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    return write_shapes_edit(out, N, seed=3, shard_size=8, size=S)


@pytest.fixture(scope="module")
def built(tmp_path_factory, shards, text):
    path = tmp_path_factory.mktemp("caches") / "cache"
    ae = tiny_ae()
    manifest = prepare_cache(path, shards, ae, text, batch_size=6, max_area=S * S, samples_per_shard=7)
    return path, manifest, ae


def read_back(manifest, **cfg):
    stream = StreamConfig(batch_size=4, mode="exact", shuffle_shards=False, shuffle_buffer=0, payload="features", **cfg)
    batches = WorkerStream(manifest.shards, stream, epoch=0, slot=0, slots=1, empty_prompt=manifest.empty_prompt())
    return [b for b in batches if b.get("_batch") is not None]


def first_image_batch(shards) -> dict:
    cfg = StreamConfig(batch_size=4, mode="exact", shuffle_shards=False, shuffle_buffer=0)
    return next(b for b in WorkerStream(shards, cfg, epoch=0, slot=0, slots=1) if b.get("_batch") is not None)


def image(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)


def test_round_trip_equals_fresh_encoding(built, text):
    path, manifest, ae = built
    assert manifest.num_samples == N and sum(manifest.tasks.values()) == N
    assert manifest.txt_shape == (32, 384) and manifest.vec_dim == 384
    assert len(manifest.shards) == 3  # 7 samples per shard

    seen = {}
    for batch in read_back(manifest):
        assert {"target_latent", "reference_latents", "txt", "vec", "instruction", "task", "key"} <= set(batch)
        b = len(batch["key"])
        assert batch["target_latent"].shape == (b, 16, S // 8, S // 8) and batch["txt"].shape == (b, 32, 384)
        for i, key in enumerate(batch["key"]):
            seen[key] = {"target": batch["target_latent"][i], "refs": [r[i] for r in batch["reference_latents"]],
                         "txt": batch["txt"][i], "vec": batch["vec"][i], "instruction": batch["instruction"][i],
                         "task": batch["task"][i]}
    assert len(seen) == N

    # Independent computation: regenerate each case and encode it alone. A random autoencoder
    # on flat-coloured images is ill-conditioned (GroupNorm over near-constant groups), so the
    # batch size alone moves latents by ~1e-3; different images differ by far more (checked).
    tol = dict(atol=1e-2, rtol=0)
    targets = torch.stack([got["target"] for got in seen.values()])
    gaps = (targets[:, None] - targets[None]).abs().amax(dim=(2, 3, 4)) + torch.eye(N) * 1e9
    assert gaps.min() > 10 * tol["atol"]
    with torch.no_grad():
        for key, got in seen.items():
            split, seed, index = key.split("-")
            case = shapes_edit.make_case(None, split=split, seed=int(seed), index=int(index), size=S)
            assert got["instruction"] == case.instruction and got["task"] == case.op
            torch.testing.assert_close(got["target"], ae.encode(image(case.target))[0], **tol)
            assert len(got["refs"]) == (case.reference is not None)
            for ref in got["refs"]:
                torch.testing.assert_close(ref, ae.encode(image(case.reference))[0], **tol)
            feats = text.encode([case.instruction])
            torch.testing.assert_close(got["txt"], feats.txt[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["vec"], feats.vec[0], atol=1e-5, rtol=1e-5)


def test_repeated_images_and_prompts_are_encoded_once(tmp_path, text, monkeypatch):
    """A data set whose samples share images and prompts (an edit chain: each target is the next
    reference, and one edit twice): every distinct image and prompt reaches its encoder once,
    and each sample's features are those of its own images."""
    from kontext.data.format import Sample, encode_image
    from kontext.data.writers import ShardWriter

    chain = shapes_edit.make_chain(6, split="train", seed=1, size=S)
    steps = [*range(6), 0]  # edit 0 again, under another key
    with ShardWriter(str(tmp_path / "chain-%06d.tar"), maxcount=100) as writer:
        for n, k in enumerate(steps):
            writer.write(Sample(f"train-1-{n:09d}", chain.edits[k].instruction, encode_image(chain.renders[k + 1]),
                                [encode_image(chain.renders[k])], {"task": chain.edits[k].op}))
    ae, images, prompts = tiny_ae(), [], []
    encode_image_batch, encode_text = ae.encode, text.encode
    monkeypatch.setattr(ae, "encode", lambda x, **kw: (images.append(len(x)), encode_image_batch(x, **kw))[1])
    monkeypatch.setattr(text, "encode", lambda p: (prompts.extend(p), encode_text(p))[1])
    manifest = prepare_cache(tmp_path / "cache", writer.shards, ae, text, batch_size=3, max_area=S * S)
    assert manifest.num_samples == 7
    assert sum(images) == len(chain.renders) == 7  # 14 image slots, 7 distinct images
    assert sorted(prompts) == sorted([e.instruction for e in chain.edits] + [""])  # each once, then the empty one
    with torch.no_grad():
        for batch in read_back(manifest):
            for i, key in enumerate(batch["key"]):
                k = steps[int(key.split("-")[-1])]
                for got, render in ((batch["target_latent"][i], chain.renders[k + 1]),
                                    (batch["reference_latents"][0][i], chain.renders[k])):
                    torch.testing.assert_close(got, encode_image_batch(image(render))[0], atol=1e-2, rtol=0)


def test_dropped_instructions_read_the_empty_prompt(built, text):
    _, manifest, _ = built
    empty = text.encode([""])
    batches = read_back(manifest, instruction_dropout=1.0)
    assert sum(len(b["key"]) for b in batches) == N
    for batch in batches:
        assert set(batch["instruction"]) == {""}
        torch.testing.assert_close(batch["txt"], empty.txt.expand_as(batch["txt"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(batch["vec"], empty.vec.expand_as(batch["vec"]), atol=1e-6, rtol=0)


def test_valid_cache_is_reused_without_encoding(built, shards, text):
    path, manifest, ae = built
    stamp = (path / "manifest.json").stat().st_mtime_ns

    def no_batches():
        raise AssertionError("a valid cache was encoded again")

    # Text given as its config: the identity comes from file hashes, nothing is loaded.
    again = build_cache(path, no_batches, ae, {"kind": "embedded", "max_length": 32}, resolution=manifest.identity.resolution,
                        source=manifest.identity.source)
    assert again.identity == manifest.identity and again.reused and not manifest.reused
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    assert prepare_cache(path, shards, ae, text, max_area=S * S).identity == manifest.identity


@pytest.mark.parametrize("change, field", [
    ("text", "text"), ("ae_weights", "autoencoder"), ("ae_scale", "autoencoder"),
    ("resolution", "resolution"), ("dtype", "dtype"),
])
def test_stale_cache_is_refused(built, shards, text, change, field):
    path, manifest, ae = built
    kwargs = dict(text=text, ae=ae, max_area=S * S, dtype="float32")
    if change == "text":
        kwargs["text"] = {"kind": "embedded", "max_length": 16}
    elif change == "ae_weights":
        kwargs["ae"] = tiny_ae(seed=1)
    elif change == "ae_scale":
        kwargs["ae"] = tiny_ae(scale=0.25)
    elif change == "resolution":
        kwargs["max_area"] = 16 * 16
    elif change == "dtype":
        kwargs["dtype"] = "float16"
    with pytest.raises(StaleCacheError, match=f"{field}: cache") as err:
        prepare_cache(path, shards, kwargs["ae"], kwargs["text"], max_area=kwargs["max_area"], dtype=kwargs["dtype"])
    assert "\n" not in str(err.value)
    identity = cache_identity(kwargs["ae"], kwargs["text"], bucket_resolution(kwargs["max_area"]),
                              manifest.identity.source, kwargs["dtype"])
    with pytest.raises(StaleCacheError):
        open_cache(path, identity)
    open_cache(path, manifest.identity)  # the cache itself is untouched


def test_other_source_is_stale_then_overwrite_rebuilds(tmp_path, built, shards, text):
    _, _, ae = built
    path = tmp_path / "cache"
    first = prepare_cache(path, shards[:2], ae, text, max_area=S * S)
    assert first.num_samples == 16
    with pytest.raises(StaleCacheError, match="source: cache"):
        prepare_cache(path, shards, ae, text, max_area=S * S)
    second = prepare_cache(path, shards, ae, text, max_area=S * S, overwrite=True, dtype="bfloat16")
    assert second.num_samples == N and second.identity.dtype == "bfloat16"
    assert open_cache(path).identity == second.identity
    batch = read_back(second)[0]
    assert batch["txt"].dtype == torch.bfloat16 and batch["target_latent"].dtype == torch.bfloat16
    fresh = text.encode([batch["instruction"][0]])
    torch.testing.assert_close(batch["txt"][0], fresh.txt[0].bfloat16())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folder left


def test_failed_build_leaves_nothing(tmp_path, built, shards, text):
    _, _, ae = built
    good = first_image_batch(shards)

    def batches():
        yield good
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_cache(tmp_path / "cache", batches, ae, text, resolution="64", source="s")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(tmp_path / "cache")


def test_killed_build_leftover_is_cleaned(tmp_path, built, shards, text):
    """A partial folder of a process that no longer runs is removed by the next build."""
    import socket

    _, _, ae = built
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".cache.partial-{socket.gethostname()}-{int(dead.stdout)}"
    leftover.mkdir()
    (leftover / "cache-000000.tar").write_bytes(b"half")
    batch = first_image_batch(shards)
    build_cache(tmp_path / "cache", [batch], ae, text, resolution="64", source="s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_damaged_cache_is_refused(tmp_path, built, shards, text):
    _, _, ae = built
    batch = first_image_batch(shards)
    path = tmp_path / "cache"
    build_cache(path, [batch], ae, text, resolution="64", source="s")
    shard = next(path.glob("*.tar"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 512)
    with pytest.raises(CacheError, match="damaged: cache-000000.tar"):
        open_cache(path)
    with pytest.raises(CacheError, match="damaged"):
        build_cache(path, [batch], ae, text, resolution="64", source="s")
    build_cache(path, [batch], ae, text, resolution="64", source="s", overwrite=True)
    assert open_cache(path).num_samples == len(batch["key"])

    # overwrite replaces caches only, never another folder.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.png").write_bytes(b"x")
    with pytest.raises(CacheError, match="is not a feature cache: not overwriting"):
        build_cache(other, [batch], ae, text, resolution="64", source="s", overwrite=True)
    assert (other / "keep.png").read_bytes() == b"x"


def test_command_builds_then_reuses(tmp_path, shards, capsys):
    from kontext.cli import run_main
    from kontext.data.cache import cache_main
    from kontext.latent.autoencoder import save_autoencoder

    ae_file = save_autoencoder(tiny_ae(), tmp_path / "ae.safetensors")
    args = [f"out={tmp_path / 'cache'}", f"shards={shards[0].rsplit('/', 1)[0]}", f"autoencoder={ae_file}",
            f"bucket_area={S * S}", "shard_size=50"]
    manifest = cache_main(args)
    assert manifest.num_samples == N and len(manifest.shards) == 1 and not manifest.reused
    assert "wrote feature cache" in capsys.readouterr().out
    assert cache_main(args).reused
    out = capsys.readouterr().out
    assert "reused feature cache" in out and f"data.empty_prompt={tmp_path / 'cache' / 'empty.safetensors'}" in out

    with pytest.raises(SystemExit) as exit_:
        run_main(cache_main, [*args, "max_length=16"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: feature cache") and "text: cache" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run_main(cache_main, [f"out={tmp_path / 'c2'}", f"shards={tmp_path / 'none'}"])
    assert capsys.readouterr().err.startswith("error: image shards for the feature cache: shard")
