"""What a flow run leaves behind when training ends: the Shapes-Edit benchmark of the EMA
weights (JSON, markdown table, picture grid), an exported checkpoint, the loss curve, a
metrics JSON with the time of each phase, and a summary that says where everything is. A LoRA
run also writes its EMA adapters (`lora/`, both layouts of `kontext.formats.lora_files`); its benchmark
and export are of the base with them merged."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

from kontext.cli import quote_text


def finish_flow_run(stage, run_dir: Path, timings: dict, sampler: dict | None = None,
                    benchmark: dict | None = None, export: bool = True) -> dict:
    from kontext.benchmark import run_benchmark
    from kontext.export import export as export_pipeline
    from kontext.stages.metrics import machine_info

    written: dict[str, Path] = {}
    adapter = stage.merge_adapters() if hasattr(stage, "merge_adapters") else None
    if adapter is not None:
        from dataclasses import asdict

        from kontext.formats.lora_files import save_adapter_files

        info = {"targets": list(stage.lora_cfg.targets), "base": str(stage.init_from),
                "flux_params": asdict(stage.params), "steps": int(stage.trainer.global_step)}
        files = save_adapter_files(adapter, run_dir / "lora", info)
        written["lora"], written["lora_diffusers"] = files["reference"], files["diffusers"]
    pipe = stage.pipeline()
    pipe.source = str(run_dir)
    config = run_dir / "config.yaml"
    if config.is_file():  # how to rebuild the text encoder, for the export's config.json
        from omegaconf import OmegaConf

        pipe.text_config = OmegaConf.to_container(OmegaConf.load(config).get("text"))

    if benchmark is not None and benchmark.get("n_per_op", 0) > 0:
        start = time.perf_counter()
        report = run_benchmark(pipe, **benchmark)
        timings["benchmark"] = time.perf_counter() - start
        written["benchmark_json"] = run_dir / "benchmark.json"
        report.to_json(written["benchmark_json"])
        written["benchmark_table"] = run_dir / "benchmark.md"
        written["benchmark_table"].write_text(report.to_markdown() + "\n")
        written["grid"] = report.save_grid(run_dir / "benchmark_grid.png")
        print("\nShapes-Edit benchmark (EMA weights):\n" + report.to_markdown())
    else:
        report = None

    if export:
        start = time.perf_counter()
        written["export"] = export_pipeline(pipe, run_dir / "export", overwrite=True)
        timings["export"] = time.perf_counter() - start

    written["loss_curve"] = run_dir / "loss_curve.csv"
    written["loss_curve"].write_text(
        "step,loss\n" + "".join(f"{s},{loss:.6f}\n" for s, loss in stage.loss_history))

    metrics = {
        "benchmark": report.flat_metrics() if report is not None else None,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": machine_info(stage.device, measure_peak=True),
        # This run's training (a resumed run: since the resume): what makes two machines' times differ.
        "training": getattr(stage, "throughput", None),
        "steps": int(stage.trainer.global_step),
        # Samples read and skipped as unreadable, by reason (this rank's training loader, all epochs).
        "data": getattr(stage, "data_stats", None),
        "final_loss": stage.loss_history[-1][1] if stage.loss_history else None,
        "files": {k: str(v) for k, v in written.items()},
    }
    written["metrics"] = run_dir / "metrics.json"
    written["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    print(summary_text(run_dir, written, metrics))
    return metrics


def summary_text(run_dir: Path, written: dict[str, Path], metrics: dict) -> str:
    lines = ["", f"Run finished: {run_dir}"]
    if metrics["benchmark"]:
        lines.append(f"  Shapes-Edit pass rate: {metrics['benchmark']['pass_rate']:.1%} (table: {written['benchmark_table']})")
    labels = {"grid": "picture grid", "benchmark_json": "benchmark JSON", "metrics": "metrics JSON",
              "loss_curve": "loss curve", "export": "exported checkpoint", "lora": "LoRA (reference)",
              "lora_diffusers": "LoRA (diffusers)"}
    lines += [f"  {label:<20} {written[k]}" for k, label in labels.items() if k in written]
    lines.append("  times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings_s"].items()))
    machine, training = metrics["machine"], metrics.get("training") or {}
    speed = f", {training['samples_per_s']:.1f} training samples/s" if training.get("samples_per_s") else ""
    peak = f", fp32 matmul peak {machine['fp32_matmul_gflops']:.0f} GFLOP/s" if machine.get("fp32_matmul_gflops") else ""
    lines.append(f"  machine: {machine['cpu']} ({machine['cpu_capability']}, {machine['threads']} threads{peak}){speed}")
    source = written.get("export", run_dir)
    lines += ["", "Edit an image with it:",
              f"  python sample.py {override('checkpoint', source)} image=path/to/image.png"
              f" {override('prompt', 'make the red circle blue')} output=edited.png", ""]
    return "\n".join(lines)


def override(key: str, value) -> str:
    """`key=value` as one shell word that Hydra reads back as `value`: a run directory named
    after its overrides (`.../trainer.max_steps=3024,trainer.max_time=null/export`) holds `=`
    and `,`, which Hydra parses unless the value is quoted."""
    text = str(value)
    if re.fullmatch(r"[\w./@~+-]*", text) is None:
        text = quote_text(text)
    word = f"{key}={text}"
    return f'"{word}"' if re.search(r'["$`\\!]', word) is None else shlex.quote(word)
