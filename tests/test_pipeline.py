"""The Python API: each mode, determinism, the size policy, image conversion, the loaders."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_kontext import random_flux, tiny_pipeline, write_run_dir

from kontext.data.shapes_edit import make_case
from kontext.errors import KontextError
from kontext.images import load_image, snap_size
from kontext.pipeline import KontextPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def case():
    return make_case("recolor", split="bench", seed=0, index=0)


class Calls:
    """Records the transformer inputs of every forward of a pipeline."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        img, img_ids, txt, txt_ids, t, y = args
        self.calls.append({"img": img.shape, "img_ids": img_ids.clone(), "txt": txt.shape, "t": t.clone(),
                           "guidance": kwargs.get("guidance")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_single_edit_is_deterministic_for_a_seed(pipe, case):
    a = pipe(case.reference, case.instruction, seed=3)
    b = pipe(case.reference, case.instruction, seed=3)
    c = pipe(case.reference, case.instruction, seed=4)
    d = pipe(case.reference, "remove the blue square", seed=3)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))  # another seed, another sample
    assert not np.array_equal(pixels(a), pixels(d))  # the instruction is used


def test_batched_edit_matches_one_by_one(pipe, case):
    other = make_case("t2i", split="bench", seed=0, index=1)
    refs = [case.reference, None, case.target]
    prompts = [case.instruction, other.instruction, "make it black"]
    batched = pipe.edit(refs, prompts, [5, 6, 7])
    for ref, prompt, seed, out in zip(refs, prompts, [5, 6, 7], batched, strict=True):
        single = pipe(ref, prompt, seed=seed)
        assert single.size == out.size
        # A batch of different size runs other matmul kernels: equal up to one 8-bit level.
        assert np.abs(pixels(single) - pixels(out)).max() <= 1


def test_several_references_become_context_tokens(pipe, case):
    small = case.target.resize((32, 48))
    with Calls(pipe.model) as calls:
        out = pipe([case.reference, small], case.instruction, seed=1)
    assert out.size == (64, 64)  # the first reference's size
    ids = calls.calls[0]["img_ids"][0]  # (L, 3)
    # target 8x8 latent = 16 tokens, then 16 tokens of reference 1 and 4x6/4 = 6 of reference 2
    assert ids.shape[0] == 16 + 16 + 6
    assert ids[:16, 0].eq(0).all() and ids[16:32, 0].eq(1).all() and ids[32:, 0].eq(2).all()
    assert ids[32:, 1].max() == 2 and ids[32:, 2].max() == 1  # the context's own grid, from 0
    one_ref = pipe(case.reference, case.instruction, seed=1)
    assert not np.array_equal(pixels(out), pixels(one_ref))


def test_text_to_image_size_and_tokens(pipe):
    with Calls(pipe.model) as calls:
        out = pipe(None, "a red circle in the center on a white background", seed=0)
    assert out.size == (64, 64)  # the pipeline's t2i size
    assert calls.calls[0]["img"][1] == 16 and calls.calls[0]["img_ids"][0, :, 0].eq(0).all()
    wide = pipe(None, "a red circle", seed=0, width=96, height=50)
    assert wide.size == (96, 48)  # snapped to multiples of 16


def test_sampler_settings_reach_the_model(pipe, case):
    with Calls(pipe.model) as calls:
        pipe(case.reference, case.instruction, seed=0, steps=3, guidance=4.0)
    assert len(calls.calls) == 3
    assert [c["t"][0].item() for c in calls.calls][0] == 1.0
    assert all(c["guidance"].eq(4.0).all() for c in calls.calls)
    with Calls(pipe.model) as calls:
        pipe(case.reference, case.instruction, seed=0, timesteps=[1.0, 0.6, 0.0])
    assert [round(c["t"][0].item(), 6) for c in calls.calls] == [1.0, 0.6]
    with Calls(pipe.model) as calls:
        guided = pipe(case.reference, case.instruction, seed=0, cfg=3.0, negative_prompt="blurry")
    assert len(calls.calls) == 2 and calls.calls[0]["img"][0] == 2  # both branches in one forward
    plain = pipe(case.reference, case.instruction, seed=0)
    assert not np.array_equal(pixels(guided), pixels(plain))
    with pytest.raises(KontextError, match="decreasing"):
        pipe(case.reference, case.instruction, timesteps=[0.0, 1.0])


def test_default_timesteps_of_a_student_and_their_override(case):
    student = tiny_pipeline(timesteps=[1.0, 0.5, 0.0], steps=30)
    with Calls(student.model) as calls:
        student(case.reference, case.instruction)
    assert len(calls.calls) == 2  # the student's list, not 30 steps
    with Calls(student.model) as calls:
        student(case.reference, case.instruction, steps=3)
    assert len(calls.calls) == 3  # explicit steps win


def test_size_policy():
    assert snap_size(64, 64) == (64, 64)
    assert snap_size(70, 50) == (64, 48)
    assert snap_size(10, 10) == (16, 16)
    assert snap_size(2000, 1000) == (1456, 720)  # preferred resolution nearest to aspect 2
    assert snap_size(1000, 1000) == (992, 992)  # under 1 MP: only floored
    assert snap_size(100, 60, max_area=64 * 64) == (80, 48)  # preferred list scaled to the area


def test_huge_reference_is_resized_per_policy(case):
    pipe = tiny_pipeline(max_area=64 * 64)
    big = case.reference.resize((100, 60))
    out = pipe(big, case.instruction, seed=0)
    assert out.size == (80, 48)
    assert pipe(big, case.instruction, seed=0, width=32).size == (32, 16)  # one side: aspect kept


def test_images_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    rgba.save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 100, 50) and img.getpixel((1, 1)) == (255, 255, 255)
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((3, 3)) == (77, 77, 77)
    deep = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (127, 127, 127)  # scaled, not clipped to 255
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert load_image(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_are_one_line_errors(tmp_path, pipe):
    with pytest.raises(KontextError, match="image not found") as err:
        pipe(tmp_path / "missing.png", "x")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(KontextError, match="cannot read image"):
        pipe(tmp_path / "junk.png", "x")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(KontextError, match="corrupt"):
        pipe(tmp_path / "cut.png", "x")


def test_checkpoint_and_run_dir_load_the_ema_weights(tmp_path, pipe, case):
    run = write_run_dir(tmp_path / "run", pipe, sampler={"steps": 2, "cfg": 1.0})  # t2i size from the data
    expected = pipe(case.reference, case.instruction, seed=2)
    for loaded in (KontextPipeline.from_run_dir(run), KontextPipeline.from_checkpoint(run / "checkpoints" / "last.ckpt"),
                   KontextPipeline.load(run)):
        assert loaded.sampler.steps == 2 and loaded.sampler.guidance == 1.0  # training guidance as default
        assert loaded.sampler.t2i_size == 64
        assert loaded.text_config["kind"] == "embedded"
        assert np.array_equal(pixels(loaded(case.reference, case.instruction, seed=2)), pixels(expected))


def test_checkpoint_that_does_not_fit_its_config(tmp_path, pipe):
    from dataclasses import replace

    # The checkpoint holds the tiny model; the run config claims a wider one.
    wider = replace(pipe.model.params, hidden_size=128, axes_dim=[8, 12, 12])
    run = write_run_dir(tmp_path / "run", pipe, model_params=wider)
    with pytest.raises(KontextError, match="wrong shape") as err:
        KontextPipeline.from_run_dir(run)
    assert "double_blocks.0.img_attn.proj.weight: file (64, 64) vs model (128, 128)" in str(err.value)
    assert "\n" not in str(err.value)


def test_loader_errors(tmp_path, pipe):
    with pytest.raises(KontextError, match="not found"):
        KontextPipeline.load(tmp_path / "nowhere")
    run = write_run_dir(tmp_path / "run", pipe)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"garbage")
    with pytest.raises(KontextError, match=r"run has no intact checkpoint: checkpoint .*last.ckpt is truncated"):
        KontextPipeline.from_run_dir(run)
    with pytest.raises(KontextError, match=r"^checkpoint .*last.ckpt is truncated or not a PyTorch checkpoint"):
        KontextPipeline.from_checkpoint(last)
    torch.save({"global_step": 1, "state_dict": {f"model.{k}": v for k, v in random_flux().state_dict().items()}},
               last)
    with pytest.raises(KontextError, match="no EMA weights"):
        KontextPipeline.from_run_dir(run)
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(KontextError, match="no checkpoints"):
        KontextPipeline.from_run_dir(run)


def test_official_files_load_and_export(tmp_path, case):
    """Reference-format files and local T5/CLIP folders, as released (here tiny and random)."""
    from dataclasses import replace

    from test_text import save_tiny_clip, save_tiny_t5
    from tiny_kontext import random_autoencoder

    from kontext.export import export
    from kontext.formats.weights import save_safetensors
    from kontext.latent.autoencoder import save_autoencoder
    from kontext.network.model import FLUX_PRESETS

    params = replace(FLUX_PRESETS["tiny"], context_in_dim=24, vec_in_dim=16)  # tiny T5 / CLIP widths
    model = random_flux(params=params)
    save_safetensors({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()},
                     tmp_path / "flux1-kontext-dev.safetensors")  # no metadata, checkpoint prefix
    save_autoencoder(random_autoencoder(), tmp_path / "ae.safetensors")
    t5, clip = save_tiny_t5(tmp_path / "t5"), save_tiny_clip(tmp_path / "clip")
    pipe = KontextPipeline.from_official(tmp_path / "flux1-kontext-dev.safetensors", tmp_path / "ae.safetensors",
                                         t5, clip, preset=params, max_length=16, dtype=torch.float32)
    assert pipe.sampler.steps == 30 and pipe.sampler.guidance == 2.5
    with Calls(pipe.model) as calls:
        edited = pipe(case.reference, "make it red", seed=0, steps=2)
    assert calls.calls[0]["txt"] == (1, 16, 24) and calls.calls[0]["guidance"].eq(2.5).all()
    out = export(pipe, tmp_path / "export")
    again = KontextPipeline.from_export(out)  # T5/CLIP rebuilt from the recorded folders
    assert again.text.identity == pipe.text.identity
    assert np.array_equal(pixels(again(case.reference, "make it red", seed=0, steps=2)), pixels(edited))
