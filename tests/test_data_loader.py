import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from kontext.data.buckets import bucket_size, preferred_size
from kontext.data.format import Sample, encode_image
from kontext.data.loader import KontextLoader, expand_shards
from kontext.data.stream import DataError, StreamConfig
from kontext.data.writers import ShardWriter, write_shapes_edit


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shards = write_shapes_edit(out, 90, shard_size=10, size=32)  # 9 shards: uneven over 4 slots
    return out, shards


def test_exact_mode_two_ranks_two_workers_each_sample_once(shapes):
    out, shards = shapes
    expected = sorted(f"train-0-{i:09d}" for i in range(90))
    cfg = StreamConfig(batch_size=4, mode="exact", max_area=32 * 32, shuffle_buffer=16)
    loaders = [KontextLoader(str(out), cfg, num_workers=2, rank=r, world_size=2) for r in range(2)]
    epochs = []
    for _ in range(2):
        per_rank = [_keys(ld) for ld in loaders]
        assert sorted(per_rank[0] + per_rank[1]) == expected
        assert not set(per_rank[0]) & set(per_rank[1]) and per_rank[0] and per_rank[1]
        epochs.append(per_rank[0] + per_rank[1])
    assert epochs[0] != epochs[1]  # shards and samples are reshuffled every epoch
    assert [ld.epoch for ld in loaders] == [1, 1]


def test_resampled_mode_fixed_epoch_length(shapes):
    out, _ = shapes
    cfg = StreamConfig(batch_size=4, mode="resampled", max_area=32 * 32, shuffle_buffer=8)
    lens = []
    for rank in range(2):
        ld = KontextLoader(f"{out}/shapes-train-0-{{000000..000008}}.tar", cfg, num_workers=2, rank=rank,
                           world_size=2, epoch_samples=40)
        batches = list(ld)
        assert len(ld) == 5 and len(batches) == 5
        assert all(len(b["key"]) == 4 for b in batches)
        lens.append(len(batches))
    assert lens[0] == lens[1]


def test_batch_format_and_exact_pixels(shapes):
    out, _ = shapes
    cfg = StreamConfig(batch_size=8, mode="exact", max_area=32 * 32, shuffle_buffer=0, shuffle_shards=False)
    batch = next(iter(KontextLoader(shards := expand_shards(str(out))[0], cfg)))
    assert set(batch) == {"target", "references", "instruction", "task", "key"}
    assert batch["target"].dtype == torch.float32 and batch["target"].shape[1:] == (3, 32, 32)
    # first sample of the first shard, decoded independently
    rec = next(iter(wds.tariterators.tarfile_samples([{"url": shards}])))
    assert rec["__key__"] == batch["key"][0]
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(rec["target.png"])).convert("RGB")))
    pixels = ((batch["target"][0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(pixels, expected) and batch["target"].min() >= -1 and batch["target"].max() <= 1
    n_refs = len(batch["references"])
    assert all(r.shape == batch["target"].shape for r in batch["references"])
    tasks = batch["task"]
    assert all((t == "t2i") == (n_refs == 0) for t in tasks)


def _sized_shards(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(100, 50), (64, 64), (50, 120), (33, 77), (200, 90)]
    with ShardWriter(str(tmp_path / "mixed-%03d.tar"), maxcount=20) as w:
        for i in range(n):
            tw, th = sizes[i % len(sizes)]
            target = Image.fromarray(rng.integers(0, 255, (th, tw, 3), dtype=np.uint8))
            refs = [Image.fromarray(rng.integers(0, 255, (sizes[(i + k) % 5][1], sizes[(i + k) % 5][0], 3),
                                                 dtype=np.uint8)) for k in range(1, 1 + i % 3)]
            w.write(Sample(f"s{i:04d}", f"edit {i}", encode_image(target),
                           [encode_image(r, "jpg") for r in refs]))
    return w.shards


@pytest.mark.parametrize("reference_size", ["strict", "loose", "preferred"])
def test_buckets_hold_one_size_and_reference_signature(tmp_path, reference_size):
    _sized_shards(tmp_path)
    area, ref_area = 48 * 48, 32 * 32
    cfg = StreamConfig(batch_size=3, mode="exact", max_area=area, reference_size=reference_size,
                       reference_area=ref_area, shuffle_buffer=10)
    seen = 0
    for batch in KontextLoader(str(tmp_path), cfg):
        b, c, h, w = batch["target"].shape
        seen += b
        assert h % 16 == 0 and w % 16 == 0 and h * w <= area
        i = int(batch["key"][0][1:])
        n_refs = i % 3
        assert len(batch["references"]) == n_refs
        assert all(len(batch["references"]) == int(k[1:]) % 3 for k in batch["key"])
        for k, ref in enumerate(batch["references"], 1):
            assert ref.shape[0] == b
            sw, sh = [(100, 50), (64, 64), (50, 120), (33, 77), (200, 90)][(i + k) % 5]
            expected = {"strict": (w, h), "loose": bucket_size(sw, sh, ref_area),
                        "preferred": preferred_size(sw, sh, ref_area)}[reference_size]
            assert ref.shape[2:] == expected[::-1]
            assert ref.shape[2] % 16 == 0 and ref.shape[3] % 16 == 0
    assert seen == 40
    assert bucket_size(100, 50, area) == (64, 32)


def _pair_shard(tmp_path, target: Image.Image, refs: list[Image.Image]) -> str:
    with ShardWriter(str(tmp_path / "pair-%03d.tar"), maxcount=10) as w:
        w.write(Sample("p0000", "edit", encode_image(target), [encode_image(r) for r in refs]))
    return w.shards[0]


def test_loose_reference_keeps_its_own_aspect_and_budget(tmp_path):
    """A 2:1 reference of a square target: loose keeps 2:1 under its own pixel budget, strict
    takes the target's square."""
    rng = np.random.default_rng(1)
    target = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 255, (60, 120, 3), dtype=np.uint8))
    shard = _pair_shard(tmp_path, target, [wide])
    base = dict(batch_size=1, mode="exact", max_area=64 * 64, shuffle_buffer=0)
    loose = next(iter(KontextLoader(shard, StreamConfig(**base, reference_size="loose", reference_area=128 * 64))))
    assert loose["target"].shape[2:] == (64, 64) and loose["references"][0].shape[2:] == (64, 128)
    expected = np.asarray(wide.resize((128, 64), Image.LANCZOS), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(loose["references"][0][0].permute(1, 2, 0), torch.from_numpy(expected), atol=1e-5)
    same_budget = next(iter(KontextLoader(shard, StreamConfig(**base, reference_size="loose"))))
    assert same_budget["references"][0].shape[2:] == (32, 80)  # 2:1 under 64 x 64 pixels, sides of 16
    strict = next(iter(KontextLoader(shard, StreamConfig(**base, reference_size="strict"))))
    assert strict["references"][0].shape[2:] == (64, 64)


def test_strict_reference_gets_the_targets_crop(tmp_path):
    """A reference at twice the target's resolution (same scene) lands on the target's pixels."""
    rng = np.random.default_rng(2)
    small = rng.integers(0, 255, (25, 50, 3), dtype=np.uint8)
    target = Image.fromarray(np.kron(small, np.ones((4, 4, 1), dtype=np.uint8)))  # 200 x 100, blocky
    ref = target.resize((400, 200), Image.NEAREST)
    shard = _pair_shard(tmp_path, target, [ref])
    batch = next(iter(KontextLoader(shard, StreamConfig(batch_size=1, mode="exact", max_area=64 * 32,
                                                         reference_size="strict", shuffle_buffer=0))))
    assert batch["target"].shape == batch["references"][0].shape == (1, 3, 32, 64)
    assert (batch["target"] - batch["references"][0]).abs().mean() < 0.02


def test_reference_size_is_checked():
    with pytest.raises(ValueError, match="reference_size"):
        StreamConfig(reference_size="own")
    assert StreamConfig(reference_size="bucket").reference_size == "strict"  # its former name
    with pytest.raises(ValueError, match="reference_area"):
        StreamConfig(reference_size="loose", reference_area=100)


def test_t2i_mixing_and_instruction_dropout(shapes):
    out, _ = shapes
    base = dict(batch_size=4, mode="exact", max_area=32 * 32, shuffle_buffer=0)
    plain = {k: (len(b["references"]), i) for b in KontextLoader(str(out), StreamConfig(**base))
             for k, i in zip(b["key"], b["instruction"], strict=True)}
    mixed = {k: (len(b["references"]), i) for b in KontextLoader(
        str(out), StreamConfig(**base, t2i_fraction=0.5, instruction_dropout=0.3))
        for k, i in zip(b["key"], b["instruction"], strict=True)}
    assert plain.keys() == mixed.keys()
    edits = [k for k, (n, _) in plain.items() if n]
    dropped = sum(mixed[k][0] == 0 for k in edits)
    assert 0.25 * len(edits) < dropped < 0.75 * len(edits)
    empty = sum(i == "" for _, i in mixed.values())
    assert 0.1 * 90 < empty < 0.5 * 90 and not any(i == "" for _, i in plain.values())
    # only references and instructions change; what is kept is the original
    assert all(mixed[k][1] in ("", plain[k][1]) for k in plain)
    # full t2i mixing: every batch has no references
    assert all(not b["references"] for b in KontextLoader(str(out), StreamConfig(**base, t2i_fraction=1.0)))


def _write_raw(path, records):
    with wds.TarWriter(str(path)) as tw:
        for r in records:
            tw.write(r)


def _good(key, size=32):
    img = encode_image(Image.new("RGB", (size, size), (10, 200, 30)))
    return {"__key__": key, "target.png": img, "ref0.png": img, "instruction.txt": b"make it so",
            "meta.json": json.dumps({"task": "edit"}).encode()}


def _corrupt_records():
    good = _good("x")["target.png"]
    return [
        {**_good("bad-garbage"), "target.png": b"\x89PNG\r\n\x1a\nnot really"},  # header unreadable
        {**_good("bad-truncated"), "target.png": good[: len(good) // 2]},  # header fine, pixels cut
        {k: v for k, v in _good("bad-notarget").items() if k != "target.png"},
        {**_good("bad-meta"), "meta.json": b"{not json"},
        {**{k: v for k, v in _good("bad-refgap").items() if k != "ref0.png"}, "ref1.png": good},
        {**_good("bad-text"), "instruction.txt": b"\xff\xfe\xfa"},
        {**_good("bad-ref"), "ref0.png": b"GIF89a...."},  # not a shard image format
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_skipped_and_counted(tmp_path, workers):
    bad = _corrupt_records()
    good = [_good(f"ok-{i:03d}") for i in range(30)]
    records = good[:10] + bad[:4] + good[10:20] + bad[4:] + good[20:]
    _write_raw(tmp_path / "a.tar", records[:25])
    _write_raw(tmp_path / "b.tar", records[25:])
    cfg = StreamConfig(batch_size=4, mode="exact", max_area=32 * 32, shuffle_buffer=5)
    ld = KontextLoader(str(tmp_path), cfg, num_workers=workers)
    keys = _keys(ld)
    assert sorted(keys) == sorted(r["__key__"] for r in good)
    assert ld.stats["corrupt"] == len(bad) == 7 and ld.stats["seen"] == 37
    assert sum(ld.stats["reasons"].values()) == 7
    assert ld.stats["reasons"]["undecodable image"] == 2 and ld.stats["reasons"]["no target image"] == 1


def test_mostly_bad_data_stops_with_clear_error(tmp_path):
    records = [{**_good(f"b{i:03d}"), "target.png": b"junk"} for i in range(80)] + [_good("ok")]
    _write_raw(tmp_path / "bad.tar", records)
    with pytest.raises(DataError, match="unreadable"):
        _keys(KontextLoader(str(tmp_path), StreamConfig(batch_size=2, mode="exact")))


def test_truncated_shard_is_read_up_to_the_break(tmp_path):
    _write_raw(tmp_path / "whole.tar", [_good(f"w{i}") for i in range(6)])
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    ld = KontextLoader(str(tmp_path / "cut.tar"), StreamConfig(batch_size=2, mode="exact", shuffle_buffer=0))
    keys = _keys(ld)
    assert 0 < len(keys) < 6 and ld.stats["corrupt"] >= 1


@pytest.mark.parametrize("mode,workers", [("exact", 0), ("exact", 2), ("resampled", 2)])
def test_state_resume_continues_with_unseen_data(shapes, mode, workers):
    out, _ = shapes
    cfg = StreamConfig(batch_size=4, mode=mode, max_area=32 * 32, shuffle_buffer=12, seed=3)

    def make():
        return KontextLoader(str(out), cfg, num_workers=workers, rank=0, world_size=1, epoch_samples=48)

    full = make()
    reference = [b["key"] for b in full] + [b["key"] for b in full]  # two epochs
    ld = make()
    it = iter(ld)
    head = [next(it)["key"] for _ in range(5)]
    state = json.loads(json.dumps(ld.state_dict()))  # survives a JSON round trip
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b["key"] for b in resumed] + [b["key"] for b in resumed]
    assert head + tail[: len(reference) - 5] == reference
    assert len(tail) == len(reference) - 5


def test_resume_after_complete_epoch_starts_the_next(shapes):
    out, _ = shapes
    cfg = StreamConfig(batch_size=8, mode="exact", max_area=32 * 32, shuffle_buffer=0)
    n = len(list(KontextLoader(str(out), cfg)))
    ld = KontextLoader(str(out), cfg)
    it = iter(ld)
    for _ in range(n):  # every batch taken, but the epoch not closed (as when a trainer stops)
        next(it)
    state = ld.state_dict()
    assert not state["finished"] and sum(state["done"].values()) == n
    again = KontextLoader(str(out), cfg)
    again.load_state_dict(state)
    keys = _keys(again)
    assert sorted(keys) == sorted(f"train-0-{i:09d}" for i in range(90)) and again.epoch == 1


def test_feature_payload_without_images(tmp_path):
    rng = np.random.default_rng(0)
    empty = {"txt": torch.zeros(8, 12), "vec": torch.zeros(12)}
    with ShardWriter(str(tmp_path / "feat-%03d.tar")) as w:
        for i in range(12):
            feats = {"target_latent": rng.standard_normal((16, 4, 4), dtype=np.float32),
                     "txt": rng.standard_normal((8, 12), dtype=np.float32) + 1,
                     "vec": rng.standard_normal(12, dtype=np.float32) + 1}
            if i % 2:
                feats["ref0_latent"] = rng.standard_normal((16, 4, 6), dtype=np.float32)
            if i % 3 == 0:  # torch tensors are stored as one safetensors blob, bf16 included
                feats = {k: torch.from_numpy(v).to(torch.bfloat16 if k == "target_latent" else torch.float32)
                         for k, v in feats.items()}
            w.write(Sample(f"f{i:03d}", f"do {i}", None, [], {"task": "edit" if i % 2 else "t2i"}, feats))
    cfg = StreamConfig(batch_size=4, mode="exact", payload="features", shuffle_buffer=0, instruction_dropout=0.5)
    batches = list(KontextLoader(str(tmp_path), cfg, empty_prompt=empty))
    assert sum(len(b["key"]) for b in batches) == 12
    n_dropped = 0
    for b in batches:
        assert b["target_latent"].shape[1:] == (16, 4, 4) and "target" not in b
        assert b["target_latent"].dtype == (torch.bfloat16 if int(b["key"][0][1:]) % 3 == 0 else torch.float32)
        assert all(len(b["reference_latents"]) == int(k[1:]) % 2 for k in b["key"])
        for j, text in enumerate(b["instruction"]):
            is_empty = bool((b["txt"][j] == 0).all()) and bool((b["vec"][j] == 0).all())
            assert is_empty == (text == "")
            n_dropped += is_empty
    assert 0 < n_dropped < 12
    with pytest.raises(ValueError, match="empty prompt"):
        KontextLoader(str(tmp_path), cfg)


def test_expand_shards_forms(shapes, tmp_path):
    out, shards = shapes
    assert expand_shards(str(out)) == shards
    assert expand_shards(f"{out}/shapes-train-0-{{000000..000002}}.tar") == shards[:3]
    assert expand_shards(f"{out}/shapes-train-0-00000[0-1].tar") == shards[:2]
    assert expand_shards(f"{shards[0]}::{shards[1]}") == shards[:2]
    assert expand_shards([f"file://{shards[0]}"]) == [f"file://{shards[0]}"]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))
    # a URL is read through webdataset's gopen
    ld = KontextLoader(f"file://{shards[0]}", StreamConfig(batch_size=5, mode="exact", max_area=32 * 32))
    assert Counter(len(b["key"]) for b in ld).total() >= 2 and ld.stats["seen"] == 10


def test_loose_reference_reaches_the_model_at_its_own_shape(tmp_path):
    """A 2:1 reference of a square target goes through the flow stage's training step as a 2:1
    grid of context tokens (ids t = 1, its own rows and columns), beside the target's square."""
    from tiny_kontext import TINY_AE, text_encoder

    from kontext.latent.autoencoder import AutoEncoder
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    rng = np.random.default_rng(3)
    target = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    shard = _pair_shard(tmp_path, target, [wide])
    cfg = StreamConfig(batch_size=1, mode="exact", max_area=64 * 64, reference_size="loose",
                       reference_area=128 * 64, shuffle_buffer=0)
    batch = next(iter(KontextLoader(shard, cfg)))
    stage = FlowStage(FLUX_PRESETS["tiny"], autoencoder=AutoEncoder(TINY_AE).eval(), text=text_encoder())
    stage.noise_generator = lambda batch_idx, device: torch.Generator(device).manual_seed(0)  # no trainer here
    seen = {}
    stage.model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(img=args[0], ids=args[1]),
                                          with_kwargs=True)
    loss = stage.training_step(batch, batch_idx=1)
    assert torch.isfinite(loss)
    target_ids, ref_ids = seen["ids"][0, :16], seen["ids"][0, 16:]
    assert seen["img"].shape[1] == 16 + 32  # 4 x 4 target patches, 4 x 8 reference patches
    assert (target_ids[:, 0] == 0).all() and (ref_ids[:, 0] == 1).all()
    assert target_ids[:, 1].max() == 3 and target_ids[:, 2].max() == 3
    assert ref_ids[:, 1].max() == 3 and ref_ids[:, 2].max() == 7
