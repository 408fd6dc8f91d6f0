"""The memory plan through ``timellm-job submit``: random kills with every memory feature on
(restarts that claim warm spares, one spare killed), an out-of-memory that ``auto`` recovers
from and one that fails at once, and a trainer killed by the kernel's OOM killer. Out-of-memory
is injected by the test-only wrapper tests/faults."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.cli import (
    REPO,
    argv,
    env_for,
    run,
    running_trainer,
    spares_of,
    start,
    state,
    wait_for_new_ground,
    wait_until,
)
from tests.jobfiles import final_state, job_dir, quick_spec

pytestmark = pytest.mark.slow
SLOW = {"TIMELLM_JOB_TEST_STEP_DELAY_S": "0.05", "TIMELLM_JOB_TEST_WRITE_DELAY_S": "0.03"}
MEMORY = {"micro_batch_size": 4, "gradient_checkpointing": True}


def train_once(folder: Path, **sections) -> dict:
    """The job trained uninterrupted by the trainer alone: what interrupted runs must reproduce."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = quick_spec(folder, **sections)
    proc = subprocess.run([sys.executable, "-m", "timellm_job.trainer", "run", str(spec)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return final_state(job_dir(spec))


def test_random_kills_with_micro_batches_checkpointing_and_fp16_end_bit_identical(tmp_path):
    sections = {"train": {**MEMORY, "epochs": 2}, "model": {"compute_dtype": "fp16"}}  # fp16 is slow on a CPU
    reference = train_once(tmp_path / "reference", **sections)
    spec = quick_spec(tmp_path, **sections)
    job = job_dir(spec)
    # a warm spare behind every attempt: the restarts claim them (trained bit for bit all the same)
    proc = start(tmp_path, "submit", str(spec), **SLOW, TIMELLM_JOB_SPARE_AFTER_S="0")
    first = running_trainer(job, submit=proc)
    spare = wait_until(lambda: spares_of(proc, {first["pid"]}), "a warm spare", alive=[proc])[0]
    spare.kill()  # a spare that dies unclaimed is replaced; the first restart claims the replacement
    wait_until(lambda: spares_of(proc, {first["pid"], spare.pid}), "the spare's replacement", alive=[proc])
    rng = random.Random(11)
    killed = 0
    for _ in range(3):
        attempt = running_trainer(job, after=len(state(job).get("attempts") or []) - 1, submit=proc, timeout=300)
        if attempt is None:
            break
        wait_for_new_ground(tmp_path, job, attempt["number"])
        time.sleep(rng.uniform(0.0, 1.0))  # anywhere in a step, between micro-batches, in a write
        if proc.poll() is not None:
            break
        os.kill(attempt["pid"], signal.SIGKILL)
        killed += 1
        running_trainer(job, after=attempt["number"], submit=proc, timeout=300)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert killed >= 2
    doc = state(job)
    plans = [a["memory_plan"] for a in doc["attempts"]]
    assert all((p["micro_batch_size"], p["gradient_checkpointing"], p["compute_dtype"]) == (4, True, "fp16")
               for p in plans), plans
    assert doc["memory_plan"]["micro_batch_size"] == 4
    assert [a["warm_spare"] for a in doc["attempts"][:2]] == [True, True]  # submit's spare, the replacement
    assert f"the warm spare (pid {spare.pid}) died unclaimed" in out and "(a warm spare)" in out
    shown = run(tmp_path, "status", str(spec)).stdout
    assert shown.count("warm") == sum(a["warm_spare"] for a in doc["attempts"]), shown  # beside their pids
    assert final_state(job) == reference


def test_an_out_of_memory_with_auto_plans_smaller_and_goes_on(tmp_path):
    reference = train_once(tmp_path / "reference", train={"micro_batch_size": 8, "epochs": 1})
    spec = quick_spec(tmp_path, train={"micro_batch_size": "auto", "epochs": 1})
    result = run(tmp_path, "submit", str(spec), TIMELLM_TEST_OOM_ABOVE_MICRO="8")
    assert result.returncode == 0, result.stderr
    doc = state(job_dir(spec))
    first, second = doc["attempts"]
    assert first["reason"].startswith("out of memory on cpu") and "micro-batch 16 of 16" in first["reason"]
    assert first["memory_plan"]["micro_batch_size"] == 16 and first["oom"]["smaller_plan"] is True
    assert (second["memory_plan"]["micro_batch_size"], second["memory_plan"]["how"]) == (8, "after-oom")
    assert "micro-batch 16 ran out of memory" in second["memory_plan"]["note"]
    assert "memory plan: micro-batch 8 of 16" in result.stderr  # submit says the plan when it is made
    # the failed attempt took no step: the job is the one a plan of 8 trains, bit for bit
    assert final_state(job_dir(spec)) == reference
    status = run(tmp_path, "status", str(spec))
    assert "micro-batch 8 of 16" in status.stdout


def test_an_out_of_memory_without_auto_fails_at_once_naming_what_to_change(tmp_path):
    spec = quick_spec(tmp_path, train={"micro_batch_size": 16, "epochs": 1}, run={"max_restarts": 10})
    result = run(tmp_path, "submit", str(spec), TIMELLM_TEST_OOM_ABOVE_MICRO="8")
    assert result.returncode == 1, result.stderr
    doc = state(job_dir(spec))
    assert len(doc["attempts"]) == 1 and doc["restarts"] == 0 and doc["phase"] == "failed"
    for field in ("train.micro_batch_size", "train.gradient_checkpointing", "data.seq_len", "micro-batch 16 of 16"):
        assert field in doc["reason"], doc["reason"]
    # the advice works: the same job with a smaller micro-batch resumes (the memory fields may change)
    again = run(tmp_path, "submit", str(spec), "--set", "train.micro_batch_size=8", TIMELLM_TEST_OOM_ABOVE_MICRO="8")
    assert again.returncode == 0, again.stderr


def _memory_cgroup() -> Path | None:
    """A fresh child of this process's memory cgroup (v1 or v2), or None where none can be made."""
    from timellm_job.orchestrator.oom_evidence import counter_file

    counter = counter_file(os.getpid())
    if counter is None:
        return None
    child = counter.parent / f"timellm-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        limit = child / ("memory.max" if (child / "memory.max").exists() else "memory.limit_in_bytes")
        limit.write_text(str(1536 << 20))
    except OSError:
        if child.exists():
            child.rmdir()
        return None
    return child


def test_a_trainer_killed_by_the_kernels_oom_killer_is_reported_as_such(tmp_path):
    cgroup = _memory_cgroup()
    if cgroup is None:
        pytest.skip("no writable memory cgroup here: the kernel's OOM killer cannot be provoked safely")
    try:
        spec = quick_spec(tmp_path, run={"max_restarts": 0})
        command = " ".join(f"'{a}'" for a in argv("submit", str(spec)))
        # submit and the pre-flight check fit in 1.5 GiB; a trainer holding 3 GiB does not
        proc = subprocess.run(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec {command}"], cwd=REPO,
                              env=env_for(tmp_path, TIMELLM_TEST_HOST_ALLOC_MB="3072"), capture_output=True,
                              text=True, timeout=600)
    finally:
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert proc.returncode == 1, proc.stderr
    attempt = state(job_dir(spec))["attempts"][0]
    assert attempt["signal"] == "SIGKILL"
    assert attempt["reason"].startswith("killed by the kernel's out-of-memory killer"), attempt["reason"]
    assert "OOM kill" in attempt["reason"] or "kernel log" in attempt["reason"]
