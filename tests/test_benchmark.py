"""The Shapes-Edit benchmark: aggregation checked with oracle pipelines, the real batched path,
the report formats and the command; and the scripts in benchmarks/ that tests run."""

import json

import pytest
import torch
from PIL import Image
from tiny_kontext import tiny_pipeline, write_run_dir

from kontext.benchmark import main, run_benchmark
from kontext.data.shapes_edit import EDIT_OPS, OPS, benchmark_cases, make_chain
from kontext.run import CONFIG_DIR

BENCHMARKS = CONFIG_DIR.parent / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


class Oracle:
    """Answers every benchmark case and chain turn with the exact target, except that ops in
    `blank` get a blank canvas (of a colour that is no background) and ops in `unchanged` get
    the reference back. A reference it never made (after a chain drifted) comes back unchanged."""

    def __init__(self, n_per_op, chains, turns, blank=(), unchanged=()):
        self.answers = {}
        for case in benchmark_cases(n_per_op):
            self.answers[self.key(case.reference, case.instruction)] = (case.op, case.target)
        for j in range(chains):
            chain = make_chain(turns, index=j)
            for k, edit in enumerate(chain.edits):
                self.answers[self.key(chain.renders[k], edit.instruction)] = (edit.op, chain.renders[k + 1])
        self.blank, self.unchanged = set(blank), set(unchanged)
        self.calls = []

    @staticmethod
    def key(reference, prompt):
        return prompt, None if reference is None else reference.tobytes()

    def edit(self, references, prompts, seeds, **sampling):
        self.calls.append((len(prompts), sampling))
        outputs = []
        for ref, prompt in zip(references, prompts, strict=True):
            if self.key(ref, prompt) not in self.answers:
                outputs.append(ref.copy())
                continue
            op, target = self.answers[self.key(ref, prompt)]
            if op in self.blank:
                outputs.append(Image.new("RGB", target.size, (0, 255, 255)))
            elif op in self.unchanged:
                outputs.append(ref.copy() if ref is not None else Image.new("RGB", target.size))
            else:
                outputs.append(target.copy())
        return outputs


def test_perfect_outputs_pass_everything():
    oracle = Oracle(3, chains=2, turns=8)
    report = run_benchmark(oracle, n_per_op=3, chains=2, turns=8, steps=4)
    assert set(report.per_op) == set(OPS)
    assert report.overall == {"n": 18, "pass_rate": 1.0, "edit_acc": 1.0, "keep_acc": 1.0}
    assert [row["turn"] for row in report.drift] == list(range(1, 9))
    assert all(row["pass_rate"] == 1.0 and row["n"] == 2 for row in report.drift)
    # Batched: one call for the 15 edits, one for the 3 t2i cases, one per chain turn.
    assert [n for n, _ in oracle.calls] == [15, 3] + [2] * 8
    assert all(s["steps"] == 4 for _, s in oracle.calls) and report.sampler["steps"] == 4


def test_blank_and_unchanged_outputs_fail_their_ops():
    oracle = Oracle(4, chains=0, turns=8, blank={"remove", "t2i"}, unchanged={"recolor"})
    report = run_benchmark(oracle, n_per_op=4, chains=0)
    assert report.per_op["remove"]["pass_rate"] == 0.0 and report.per_op["t2i"]["pass_rate"] == 0.0
    assert report.per_op["t2i"]["keep_acc"] == 0.0  # the background is wrong everywhere
    assert report.per_op["recolor"]["pass_rate"] == 0.0
    assert report.per_op["recolor"]["edit_acc"] == 0.0 and report.per_op["recolor"]["keep_acc"] == 1.0
    for op in ("add", "move", "background"):
        assert report.per_op[op]["pass_rate"] == 1.0
    assert report.overall["pass_rate"] == pytest.approx(3 / 6)
    assert report.drift == []
    flat = report.flat_metrics()
    assert flat["pass_rate"] == pytest.approx(0.5) and flat["remove/pass_rate"] == 0.0 and flat["add/keep_acc"] == 1.0
    assert all(isinstance(v, float) for v in flat.values())


def test_drift_counts_each_turn(tmp_path):
    oracle = Oracle(1, chains=3, turns=4, unchanged=set(EDIT_OPS))
    report = run_benchmark(oracle, n_per_op=1, chains=3, turns=4)
    assert [row["pass_rate"] for row in report.drift] == [0.0] * 4
    assert set(report.flat_metrics()) >= {f"drift/turn_{k}" for k in range(1, 5)}


def test_report_formats(tmp_path):
    report = run_benchmark(Oracle(2, chains=1, turns=2, blank={"move"}), n_per_op=2, chains=1, turns=2)
    data = json.loads(report.to_json(tmp_path / "b.json"))
    assert data["per_op"]["move"]["pass_rate"] == 0.0 and len(data["cases"]) == 12 and len(data["drift"]) == 2
    assert json.loads((tmp_path / "b.json").read_text()) == data
    md = report.to_markdown()
    assert "| move | 2 | 0.000 |" in md and "| **overall** | 12 | 0.833 |" in md and "Wall time" in md
    grid = Image.open(report.save_grid(tmp_path / "grid.png", scale=2))
    assert grid.size == (7 * 128, 12 * 128)  # 2 examples per op; ref, 4-cell text, output, target


def test_real_pipeline_runs_batched():
    pipe = tiny_pipeline()
    forwards = []
    handle = pipe.model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        report = run_benchmark(pipe, n_per_op=2, chains=2, turns=2, steps=2)
    finally:
        handle.remove()
    # 10 edit cases in one batch, 2 t2i in another, 2 chains x 2 turns; 2 steps each.
    assert forwards == [10, 10, 2, 2] + [2] * 4
    assert report.overall["n"] == 12 and len(report.drift) == 2
    assert report.sampler["steps"] == 2 and report.sampler["guidance"] == 1.0 and report.wall_time > 0
    assert 0.0 <= report.overall["pass_rate"] <= 1.0


def test_benchmark_command(tmp_path, capsys):
    run = write_run_dir(tmp_path / "run", tiny_pipeline())
    main([f"checkpoint={run}", "n=1", "chains=1", "turns=2", "steps=2", f"out={tmp_path / 'bench'}"])
    printed = capsys.readouterr().out
    assert "| operation | cases | pass rate |" in printed and "| **overall** | 6 |" in printed
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["benchmark.json", "benchmark.md", "grid.png"]
    data = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert data["settings"]["model"].endswith("last.ckpt") and data["sampler"]["steps"] == 2


def _benchmark_script(name: str):
    """The module of `benchmarks/{name}.py`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class VelocityOracle(torch.nn.Module):
    """Knows the clean target tokens x, so answers z_t with the exact velocity (z_t - x) / t."""

    def __init__(self, clean):
        super().__init__()
        self.clean, self.anchor = clean, torch.nn.Parameter(torch.zeros(()))

    def forward(self, img, img_ids, txt, txt_ids, t, vec, guidance=None, n_out=None, txt_multiplicity=None):
        n = self.clean.shape[1]
        assert n_out == n  # only the target's predictions are asked for
        return (img[:, :n] - self.clean) / t[:, None, None]


def test_heldout_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    from kontext.network import packing

    script = _benchmark_script("heldout_loss")
    pipe = tiny_pipeline(seed=1)
    cases = {"recolor": script.cases_by_op(3, "bench")["recolor"]}
    random = script.heldout_loss(pipe, cases, [0.3, 0.9])
    assert random["recolor"] > 0.01 and random["mean"] == random["recolor"]
    clean = packing.prepare(pipe.encode_images([c.target for c in cases["recolor"]]),
                            [pipe.encode_images([c.reference for c in cases["recolor"]])]).img
    pipe.model = VelocityOracle(clean)
    assert script.heldout_loss(pipe, cases, [0.3, 0.9])["recolor"] < 1e-10


def test_heldout_loss_command(tmp_path, capsys):
    from kontext.cli import run_main
    from kontext.export import export

    script = _benchmark_script("heldout_loss")
    export(tiny_pipeline(seed=1), tmp_path / "a")
    export(tiny_pipeline(seed=2), tmp_path / "b")
    rows = script.main([f"models=[{tmp_path / 'a'},{tmp_path / 'b'}]", "n=1", "t=[0.5]", f"out={tmp_path / 'out'}"])
    assert [list(r["loss"]) for r in rows] == [[*OPS, "mean"]] * 2
    assert rows[0]["loss"] != rows[1]["loss"]
    saved = json.loads((tmp_path / "out" / "heldout_loss.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["t"] == [0.5]
    with pytest.raises(SystemExit):
        run_main(script.main, [f"models={tmp_path / 'a'}", "t=[0.0]"])
    assert "t must be times in (0, 1]" in capsys.readouterr().err
    train = script.cases_by_op(2, "train")
    assert all(len(train[op]) == 2 and all(c.split == "train" for c in train[op]) for op in OPS)


def test_text_compaction_benchmark_runs_and_finds_the_outputs_equal():
    import subprocess
    import sys

    script = BENCHMARKS / "text_compaction.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--steps", "1"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["edit"]["text_rows"] == [32, 11]  # Shapes-Edit edits fit in 11 of the 32 rows (10 + 1)
    assert result["edit"]["max_abs_diff"] < 1e-4 and result["edit"]["ms_compact"] > 0


@pytest.mark.parametrize(("chain", "kind"), [
    (["Optimizer.clip_grad_norm", "aten::_foreach_norm", "aten::linalg_vector_norm"], "optimizer, clipping, EMA"),
    (["Optimizer.ema", "aten::_foreach_lerp_", "aten::lerp_"], "optimizer, clipping, EMA"),
    (["aten::linear", "aten::t"], "linear layers (linear, mm, addmm)"),
    (["autograd::engine::evaluate_function: AddmmBackward0", "AddmmBackward0", "aten::mm"],
     "linear layers (linear, mm, addmm)"),
    (["autograd::engine::evaluate_function: AddmmBackward0"], "linear layers (linear, mm, addmm)"),
    (["autograd::engine::evaluate_function: GeluBackward0", "GeluBackward0"], "autograd engine"),
    (["autograd::engine::evaluate_function: GeluBackward0", "GeluBackward0", "aten::gelu_backward"],
     "element-wise, norms, activations, reductions"),
    (["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::empty"],
     "attention (SDPA forward and backward)"),
    (["aten::gelu", "aten::empty"], "element-wise, norms, activations, reductions"),
    (["aten::reshape", "aten::clone", "aten::copy_"], "copies and concatenation"),
    (["aten::reshape", "aten::_reshape_alias"], "views, reshapes and allocation"),
])
def test_throughput_breakdown_gives_an_operator_the_kind_of_the_outermost_one_that_has_one(chain, kind):
    assert _benchmark_script("throughput").kind_of(chain) == kind


def test_throughput_step_flops_count_every_image_token_and_predict_the_target():
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.metrics import attention_flops, flux_flops

    params, b = FLUX_PRESETS["small"], 3
    txt = torch.zeros(b, 32, params.context_in_dim)
    txt[:, :5] = 1.0  # five prompt rows, then padding
    batch = {"x": torch.zeros(b, 16, 8, 8), "refs": [torch.zeros(b, 16, 8, 8)], "txt": txt}
    script = _benchmark_script("throughput")
    # 16 target and 16 reference tokens; the compacted text keeps the prompt rows and one padding row.
    assert script.step_flops(params, batch, compact=True) == (3 * b * flux_flops(params, 32, 6, 16),
                                                              3 * b * attention_flops(params, 32, 6, 16))
    assert script.step_flops(params, batch, compact=False, predicts_all=True) == (
        3 * b * flux_flops(params, 32, 32, 32), 3 * b * attention_flops(params, 32, 32, 32))


def test_throughput_benchmark_runs_and_accounts_for_the_step():
    import subprocess
    import sys

    script = BENCHMARKS / "throughput.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--batch", "2", "--steps", "6",
                          "--threads", "1"], check=True, capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    ours = result["results"]["ours"]
    assert ours["ms_edit"] > 0 and ours["ms_t2i"] > 0 and 0 < ours["peak_share"] < 1
    if result["max_abs_diff"] is not None:  # diffusers installed: the same function, guidance input included
        assert result["max_abs_diff"] < 1e-5
    breakdown = result["breakdown"]
    # The six profiled batches are the timed mix: the breakdown's FLOPs are the step's.
    assert breakdown["linear_gflop"] + breakdown["attention_gflop"] == pytest.approx(ours["gflop_per_step"], abs=1e-4)
    ms = breakdown["ms"]
    assert ms["linear layers (linear, mm, addmm)"] > 0 and ms["attention (SDPA forward and backward)"] > 0
    assert ms["optimizer, clipping, EMA"] > 0
    assert ms["outside any operator (Python, the profiler)"] >= 0  # the operators' own times fit in the wall time
    assert "a step at 70% of the peak takes" in out
