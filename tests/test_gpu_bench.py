"""The GPU benchmark script runs on a CPU with a tiny shape, so it does not rot between GPU runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_tiny_on_cpu_through_the_trainers_nf4_loader():
    out = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--tiny"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["device"] == "cpu" and info["steps_timed"] == 3
    for key in ("build_and_quantize_s", "step_s_median", "samples_per_s", "save_stall_s", "resume_s"):
        assert math.isfinite(info[key]) and info[key] > 0
    assert info["checkpoint_bytes"] > info["trainable_params"] * 12  # parameters + two Adam moments, fp32
