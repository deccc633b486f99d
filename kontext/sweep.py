"""The results of a sweep in one markdown table: one row per finished run (a run directory with
the `metrics.json` its finish wrote), named by the overrides that made it.

    python slurm/collect.py outputs/train > results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("steps", "steps", "{:d}"), ("final_loss", "final loss", "{:.4f}"),
           ("pass_rate", "pass rate", "{:.3f}"), ("edit_acc", "edit acc", "{:.3f}"),
           ("keep_acc", "keep acc", "{:.3f}"), ("train_s", "train (s)", "{:.0f}")]


def overrides_of(run_dir: Path) -> str:
    """The command-line overrides of a run (Hydra's record), else its directory name."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if record.is_file():
        import yaml

        items = yaml.safe_load(record.read_text()) or []
        return " ".join(items) or "(defaults)"
    return run_dir.name


def collect(root: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        bench = metrics.get("benchmark") or {}
        rows.append({"run": overrides_of(path.parent), "dir": str(path.parent), "steps": metrics.get("steps"),
                     "final_loss": metrics.get("final_loss"), "pass_rate": bench.get("pass_rate"),
                     "edit_acc": bench.get("edit_acc"), "keep_acc": bench.get("keep_acc"),
                     "train_s": (metrics.get("timings_s") or {}).get("train")})
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = ["" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| `{row['run']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Final metrics of every run under a directory, as markdown.")
    parser.add_argument("root", nargs="?", default="outputs", help="searched recursively for metrics.json")
    args = parser.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        raise SystemExit(f"no finished runs (metrics.json) under {args.root}")
    print(markdown(rows))
