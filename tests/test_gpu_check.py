"""The GPU check script (benchmarks/gpu_check.py) runs its whole path on 2 CPU processes: the
12B layout's recipe (FSDP2, parallel=paper) narrowed, fine-tuned from a file by per-rank slices,
a checkpoint, a resume, the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kontext.run import CONFIG_DIR


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_resumes(tmp_path):
    script = CONFIG_DIR.parent / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--cpu", "--steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["resumed where it stopped"] is True, report
    assert report["built on meta, init_from read by slices"] is True, report
    assert report["peak memory per rank (GiB, largest rank)"] > 0 and report["samples/s (median of logged steps, all ranks)"] > 0
    config = (tmp_path / "run" / "config.yaml").read_text()  # what train.py resolved, not what the script printed
    assert "param_dtype: bfloat16" in config and "FSDPStrategy" in config and "max_steps: 4" in config
