"""Adapter files (kontext/formats/lora_files.py) against independent implementations: diffusers'
`FluxTransformer2DModel` with the diffusers-layout file loaded by diffusers' own LoRA loaders
gives our output with peft's adapters; the reference (ComfyUI) layout round-trips and its
merge is `W + (alpha / r) B A` computed here by hand; a diffusers adapter trained on diffusers'
own split layers (another trainer's file) merges into our fused layers exactly."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from kontext.errors import KontextError
from kontext.formats.diffusers_format import bfl_to_diffusers, diffusers_config
from kontext.formats.lora_files import (
    Adapter,
    LoraWeights,
    merge,
    read_adapter,
    save_adapter_files,
    save_diffusers,
    save_reference,
)
from kontext.network.lora import ADAPTER, adapters, add_adapters, lora_options, unwrap
from kontext.network.model import build_flux, get_params
from kontext.network.packing import prepare, txt_ids

diffusers = pytest.importorskip("diffusers")

# Every kind of linear layer the mapping knows: fused qkv and linear1 (split by diffusers), plain
# renames, the modulations, the input embedders, and the final adaLN (halves swapped by diffusers).
EVERY_KIND = ["img_attn.qkv", "txt_attn.qkv", "*.proj", "img_mlp", "txt_mlp", "*_mod", "linear1", "linear2",
              "modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"]
RANK, ALPHA = 4, 6.0  # alpha != rank: the scale alpha / rank must reach every loader


def random_model():
    """The tiny preset with every weight non-trivial (modulation included), fp32."""
    model = build_flux(get_params("tiny")).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("scale") else noise / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1 * noise)
    return model


def with_random_adapters(model, targets, seed=3):
    """peft adapters on `targets`, with random A and B (B starts at zero in training: not here)."""
    add_adapters(model, lora_options({"rank": RANK, "alpha": ALPHA, "targets": targets}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # an update of about a fifth of each weight
                p.copy_(0.12 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(b=2, n_txt=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    tok = prepare(torch.randn(b, 16, 8, 8, generator=g), [torch.randn(b, 16, 4, 6, generator=g)])
    img, img_ids = tok.joint()
    return {"img": img, "img_ids": img_ids, "txt": torch.randn(b, n_txt, 384, generator=g),
            "txt_ids": txt_ids(b, n_txt), "t": torch.rand(b, generator=g),
            "y": torch.randn(b, 384, generator=g), "guidance": torch.full((b,), 2.5)}


def theirs_from(base_state, params):
    config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
    model = diffusers.FluxTransformer2DModel(**config).eval()
    model.load_state_dict(bfl_to_diffusers(base_state, params), strict=True)
    return model


def run_theirs(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["t"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


@pytest.fixture(scope="module")
def adapted():
    """(base state dict, our model with adapters on every kind of layer, its output on `inputs()`)."""
    model = random_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with_random_adapters(model, EVERY_KIND)
    with torch.no_grad():
        out = model(**inputs())
        plain = unwrap(random_model())(**inputs())
    # The adapters change the output (the comparisons below are not vacuous), which stays of order 1.
    assert (out - plain).abs().mean() > 0.1 * out.abs().mean() and out.abs().max() < 50
    return base, model, out


def test_diffusers_layout_loads_into_diffusers_and_gives_our_output(adapted, tmp_path):
    base, model, ours = adapted
    params = model.params
    adapter = adapters(model)
    # 10 linears per double block, 3 per single block, 8 in the embedders, 2 in the final layer
    assert len(adapter.layers) == 2 * 10 + 2 * 3 + 8 + 2
    path = save_diffusers(adapter, tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # The fused projections are split as diffusers has them; A shared, B split by rows.
    assert {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight",
            "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight",
            "transformer.norm_out.linear.lora_A.weight", "transformer.x_embedder.lora_B.weight"} <= keys
    config = json.loads(meta["lora_adapter_metadata"])  # the scale is folded into B: alpha = r
    assert config["transformer.r"] == config["transformer.lora_alpha"] == RANK
    assert json.loads(meta["kontext.network.lora"])["alpha"] == ALPHA

    x = inputs()
    # 1. the model's own loader (which reads no metadata from a path unless use_safetensors=True)
    theirs = theirs_from(base, params)
    theirs.load_lora_adapter(str(path), prefix="transformer")
    with torch.no_grad():
        want = run_theirs(theirs, x)
    torch.testing.assert_close(want, ours, atol=1e-5, rtol=1e-5)
    # 2. a FluxKontextPipeline's load_lora_weights (the pipeline holds only the transformer here:
    # the adapter touches nothing else)
    theirs = theirs_from(base, params)
    pipe = diffusers.FluxKontextPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                         text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                         transformer=theirs)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        torch.testing.assert_close(run_theirs(pipe.transformer, x), ours, atol=1e-5, rtol=1e-5)
        assert (run_theirs(theirs_from(base, params), x) - ours).abs().max() > 1e-4  # the adapter mattered


def test_reference_layout_round_trips_and_merges_as_by_hand(adapted, tmp_path):
    base, model, ours = adapted
    adapter = adapters(model)
    path = save_reference(adapter, tmp_path / "adapter.safetensors", {"base": "somewhere"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.alpha")
    # ComfyUI's keys: diffusion_model.<reference layer>.lora_A.weight / .lora_B.weight / .alpha
    assert keys == {f"diffusion_model.{name}.{part}" for name in adapter.layers
                    for part in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert alpha.ndim == 0 and alpha.item() == ALPHA
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert json.loads(meta["kontext.network.lora"])["base"] == "somewhere"

    back = read_adapter(path)
    assert back.layers.keys() == adapter.layers.keys()
    for name, w in adapter.layers.items():
        got = back.layers[name]
        assert torch.equal(got.down, w.down) and torch.equal(got.up, w.up) and got.alpha == ALPHA

    merged = build_flux(model.params).eval()
    merged.load_state_dict(base)
    merge(merged, back)
    by_hand = dict(base)
    for name, w in adapter.layers.items():
        by_hand[f"{name}.weight"] = base[f"{name}.weight"] + (ALPHA / RANK) * w.up @ w.down
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, by_hand[key], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs()), ours, atol=1e-5, rtol=1e-5)  # = peft's unmerged forward


def test_diffusers_layout_reads_back(adapted, tmp_path):
    """Our diffusers file read back is the same adapter: the same A; B and alpha exactly when
    alpha = r, else the scale folded into B (the same update to float rounding)."""
    _, model, _ = adapted
    adapter = adapters(model)
    files = save_adapter_files(adapter, tmp_path / "lora")
    assert files["diffusers"] == tmp_path / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"
    for source in (files["diffusers"], files["diffusers"].parent):  # a file or its folder
        back = read_adapter(source)
        assert back.layers.keys() == adapter.layers.keys()
        for name, w in adapter.layers.items():
            got = back.layers[name]
            assert torch.equal(got.down, w.down) and got.alpha == RANK, name
            torch.testing.assert_close(got.up, w.up * (ALPHA / RANK), atol=0, rtol=1e-6)
    assert read_adapter(tmp_path / "lora").layers.keys() == adapter.layers.keys()  # the folder: the reference file
    unit = Adapter({name: LoraWeights(w.down, w.up, float(w.rank)) for name, w in adapter.layers.items()})
    back = read_adapter(save_diffusers(unit, tmp_path / "unit.safetensors"))
    assert all(torch.equal(back.layers[n].up, w.up) and back.layers[n].alpha == w.alpha for n, w in unit.layers.items())


def test_another_trainers_diffusers_adapter_merges_into_our_fused_layers(adapted, tmp_path):
    """An adapter trained on diffusers' split layers (own A for q, k and v; some parts not
    adapted at all), saved by diffusers' pipeline: merged into our fused qkv / linear1 it gives
    diffusers' output with the adapter."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base, model, _ = adapted
    theirs = theirs_from(base, model.params)
    config = LoraConfig(r=3, lora_alpha=5.0, target_modules=["to_q", "to_k", "add_v_proj", "proj_mlp", "to_out.0",
                                                             "norm_out.linear", "ff.net.2"])
    theirs.add_adapter(config)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                p.copy_(0.12 * torch.randn(p.shape, generator=g))
        want = run_theirs(theirs, inputs())
    diffusers.FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(theirs),
                                                    transformer_lora_adapter_metadata=config.to_dict())
    adapter = read_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    # q and k of a double block carry their own A: fused as one adapter of rank 3 + 3
    assert adapter.layers["double_blocks.0.img_attn.qkv"].rank == 6
    assert adapter.layers["single_blocks.0.linear1"].rank == 9  # q, k and the MLP's input; v not adapted
    ours = build_flux(model.params).eval()
    ours.load_state_dict(base)
    merge(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs()), want, atol=1e-5, rtol=1e-5)


def test_merge_refuses_an_adapter_that_does_not_fit(adapted):
    _, model, _ = adapted
    plain = build_flux(model.params)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    wrong = Adapter({"double_blocks.0.img_attn.qkv": LoraWeights(torch.zeros(2, 64), torch.zeros(100, 2), 2.0),
                     "double_blocks.7.img_attn.qkv": LoraWeights(torch.zeros(2, 64), torch.zeros(192, 2), 2.0)})
    with pytest.raises(KontextError) as err:
        merge(plain, wrong, what="adapter x.safetensors")
    message = str(err.value)
    assert "\n" not in message and message.startswith("adapter x.safetensors does not fit the model")
    assert "1 layers not in the model (e.g. double_blocks.7.img_attn.qkv)" in message
    assert "double_blocks.0.img_attn.qkv: adapter 100x64 vs layer (192, 64)" in message
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # nothing changed


@pytest.mark.parametrize(("sd", "message"), [
    ({"diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3)}, "is not a LoRA weight"),
    ({"diffusion_model.img_in.lora_A.weight": torch.zeros(2, 64)}, "lack their lora_A or lora_B"),
    ({"img_in.lora_A.weight": torch.zeros(2, 64), "img_in.lora_B.weight": torch.zeros(64, 3)}, "do not form a low-rank pair"),
    ({"transformer.no_such_layer.lora_A.weight": torch.zeros(2, 64),
      "transformer.no_such_layer.lora_B.weight": torch.zeros(64, 2)}, "not a linear layer of diffusers"),
])
def test_a_file_that_is_not_an_adapter_is_one_line(sd, message, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KontextError, match=message) as err:
        read_adapter(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(KontextError, match="LoRA file not found"):
        read_adapter(tmp_path / "missing.safetensors")


def test_adapter_names_follow_peft(adapted):
    _, model, _ = adapted
    layer = model.get_submodule("double_blocks.0.img_attn.qkv")
    assert layer.lora_A[ADAPTER].weight.shape == (RANK, 64) and layer.lora_B[ADAPTER].weight.shape == (192, RANK)


# ----------------------------------------------------------------- sample.py and the export

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_kontext import tiny_pipeline

    from kontext.export import export

    return export(tiny_pipeline(seed=2), tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two adapters of the tiny model on different layers, one per layout."""
    folder = tmp_path_factory.mktemp("adapters")
    a = adapters(with_random_adapters(random_model(), ["img_attn.qkv", "linear1"], seed=1))
    b = adapters(with_random_adapters(random_model(), ["txt_mlp", "*.proj"], seed=2))
    return (a, save_reference(a, folder / "a.safetensors")), (b, save_diffusers(b, folder / "b.safetensors"))


def sample(model_dir, *overrides) -> int:
    from hydra import compose, initialize_config_dir

    from kontext.run import CONFIG_DIR
    from kontext.sample import run_sample

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"checkpoint={model_dir}", "progress=false", "steps=2", *overrides])
    return run_sample(cfg)


def test_sample_merges_adapters_at_their_scales(model_dir, two_adapters, tmp_path):
    import numpy as np
    from PIL import Image

    from kontext.pipeline import KontextPipeline

    (a, a_file), (b, b_file) = two_adapters
    prompt = "a red circle in the center on a white background"
    assert sample(model_dir, f"prompt='{prompt}'", f"output={tmp_path / 'plain.png'}") == 0
    # Large scales: the tiny random model (near its adaLN-Zero start) reacts little to its weights.
    assert sample(model_dir, f"prompt='{prompt}'", f"output={tmp_path / 'one.png'}", f"lora={a_file}",
                  "lora_scale=8") == 0
    assert sample(model_dir, f"prompt='{prompt}'", f"output={tmp_path / 'two.png'}", f"lora=[{a_file},{b_file}]",
                  "lora_scale=[8,12]") == 0
    pipe = KontextPipeline.from_export(model_dir)
    plain = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    for name, w in a.layers.items():  # merged by hand
        pipe.model.get_submodule(name).weight.data += 8 * (ALPHA / RANK) * w.up @ w.down
    one = np.asarray(pipe(None, prompt, seed=0, steps=2))
    for name, w in b.layers.items():
        pipe.model.get_submodule(name).weight.data += 12 * (ALPHA / RANK) * w.up @ w.down
    two = np.asarray(pipe(None, prompt, seed=0, steps=2))
    images = {k: np.asarray(Image.open(tmp_path / f"{k}.png").convert("RGB")) for k in ("plain", "one", "two")}
    assert np.abs(images["one"].astype(int) - one).max() <= 1 and np.abs(images["two"].astype(int) - two).max() <= 1
    assert np.abs(images["one"].astype(int) - images["plain"]).mean() > 2  # the adapters change the picture
    assert np.abs(images["two"].astype(int) - images["one"]).mean() > 1
    pipe.model.load_state_dict(plain)
    assert np.array_equal(np.asarray(pipe(None, prompt, seed=0, steps=2)), images["plain"])


def test_an_adapter_that_does_not_fit_the_model_is_one_line(model_dir, tmp_path, capsys):
    params = get_params("tiny")
    params.hidden_size, params.num_heads, params.axes_dim = 96, 6, [4, 6, 6]
    wrong = adapters(with_random_adapters(build_flux(params), ["img_attn.qkv"]))
    path = save_reference(wrong, tmp_path / "wrong.safetensors")
    assert sample(model_dir, "prompt=x", f"output={tmp_path / 'x.png'}", f"lora={path}") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: LoRA {path} does not fit the model: 2 of another shape "
                   "(double_blocks.0.img_attn.qkv: adapter 288x96 vs layer (192, 64); "
                   "double_blocks.1.img_attn.qkv: adapter 288x96 vs layer (192, 64))"]
    assert not (tmp_path / "x.png").exists()


def test_export_merges_adapters_into_the_model(model_dir, two_adapters, tmp_path):
    from kontext.export import main
    from kontext.network.model import load_flux

    (a, a_file), (b, b_file) = two_adapters
    main([f"source={model_dir}", f"out={tmp_path / 'merged'}", f"lora=[{a_file},{b_file}]", "lora_scale=[1,0.25]"])
    base = load_flux(model_dir / "transformer.safetensors").state_dict()
    merged = load_flux(tmp_path / "merged" / "transformer.safetensors").state_dict()
    for key, value in merged.items():
        want = base[key].clone()
        for adapter, scale in ((a, 1.0), (b, 0.25)):
            layer = key.removesuffix(".weight")
            if key.endswith(".weight") and layer in adapter.layers:
                want += scale * (ALPHA / RANK) * adapter.layers[layer].up @ adapter.layers[layer].down
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0, msg=key)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["source"].endswith(f"{b_file} x0.25")
