"""The GPU benchmark script runs on a CPU with a tiny shape, so it does not rot between GPU runs:
every part (plans, full-batch configurations, fp16 against bf16, the out-of-memory through the
CLI, saves and their profile) runs through the trainer's own code."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains through the trainer in a subprocess, about a minute

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_every_part_tiny_on_cpu_through_the_trainer():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--tiny"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["device"] == "cpu"
    assert [p["plan"]["compute_dtype"] for p in info["plans"]] == ["fp16", "bf16"]
    assert all(p["plan"]["micro_batch_size"] == 4 and p["step_s"] > 0 for p in info["plans"])
    assert [(c["compute_dtype"], c["gradient_checkpointing"]) for c in info["full_batch"]] == \
        [("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True)]
    fp16, bf16 = info["loss"]["fp16"]["losses"], info["loss"]["bf16"]["losses"]
    assert len(fp16) == len(bf16) == 5 and all(math.isfinite(v) for v in fp16 + bf16)
    assert abs(fp16[0] - bf16[0]) < 0.05 * bf16[0]  # the same weights and batch, two roundings
    for key in ("save_stall_s", "resume_s", "save_write_s"):
        assert math.isfinite(info[key]) and info[key] > 0
    assert info["checkpoint_bytes"] > info["trainable_params"] * 12  # parameters + two Adam moments, fp32
    saves = info["saves"]
    assert saves["background_ratio"] > 0 and saves["sync_ratio"] > 0 and saves["background_1_ratio"] > 0
    for mode in ("background", "background-1"):  # every save's write overlapped steps; the last one's waited
        m = saves["modes"][mode]
        assert m["in_flight_steps"] > 0, m
        assert math.isclose(m["total_s"], m["train_s"] + m["final_wait_s"], rel_tol=1e-6), m
    assert saves["modes"]["sync"]["in_flight_steps"] == 0
    profile = info["saves_profile"]
    assert len(profile["with_save_in_flight"]["step_s"]) == len(profile["without_save"]["step_s"]) >= 3
    assert profile["with_save_in_flight"]["top_self_cpu"]
    forced, auto = info["oom"]["forced"], info["oom"]["auto"]
    assert (forced["exit"], forced["phase"], forced["attempts"]) == (1, "failed", 1)
    assert forced["reason"].startswith("out of memory on cpu") and "train.micro_batch_size" in forced["reason"]
    assert (auto["exit"], auto["phase"]) == (0, "completed")
    assert auto["attempts"][-1]["memory_plan"]["micro_batch_size"] == 2
