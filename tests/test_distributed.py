"""Two processes under torchrun (gloo on CPU) through ``timellm-job submit``: random SIGKILLs of
one rank, a SIGTERM to everything, a stopped rank. Every interrupted run must end bit-identical
to an uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.cli import (
    PATIENCE_S,
    is_trainer,
    resume_after_preemption,
    run,
    running_trainer,
    start,
    state,
    wait_for_progress,
    wait_for_step,
    wait_until,
)
from tests.jobfiles import copy_of, final_state, job_dir, quick_spec
from timellm_job.trainer.data import eval_batches, eval_rounds, load_splits, train_batches

pytestmark = pytest.mark.slow
SLOW = {"TIMELLM_JOB_TEST_STEP_DELAY_S": "0.08", "TIMELLM_JOB_TEST_WRITE_DELAY_S": "0.03"}
TWO = {"nproc": 2}


def ranks(torchrun_pid: int, timeout: float = PATIENCE_S) -> dict[int, psutil.Process]:
    """The trainer processes torchrun started, by rank (from their environment), once both run.
    Raises psutil.NoSuchProcess when torchrun has ended (the job finished or the group was torn
    down); fails when it runs on without two trainers."""
    torchrun = psutil.Process(torchrun_pid)

    def both() -> dict[int, psutil.Process] | None:
        if not torchrun.is_running() or torchrun.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(torchrun_pid)
        found = {}
        try:
            for p in torchrun.children(recursive=True):
                if is_trainer(p.cmdline()):
                    found[int(p.environ()["RANK"])] = p
        except psutil.Error:
            return None  # a child that ended as it was read: look again
        return found if len(found) == 2 else None

    return wait_until(both, f"torchrun ({torchrun_pid}) starting two trainers", timeout)


@pytest.fixture(scope="module")
def reference2_job(tmp_path_factory):
    """The job trained once, uninterrupted, by two processes: its folder."""
    tmp = tmp_path_factory.mktemp("reference2")
    spec = quick_spec(tmp, train=TWO)
    result = run(tmp, "submit", str(spec))
    assert result.returncode == 0, result.stderr
    return job_dir(spec)


@pytest.fixture(scope="module")
def reference2(reference2_job):
    return final_state(reference2_job)


def test_the_data_order_is_split_across_ranks_and_resumes_in_place(tmp_path):
    from timellm_job.jobs import load_spec
    from timellm_job.trainer.data import data_options

    spec = load_spec(quick_spec(tmp_path))
    train = load_splits(spec.data, data_options(spec)).train
    whole = list(train_batches(train, 16, seed=3, epoch=1))
    halves = [list(train_batches(train, 16, seed=3, epoch=1, rank=r, world=2)) for r in (0, 1)]
    for (b, (x, y, _c)), (b0, (x0, y0, _)), (b1, (x1, y1, _)) in zip(whole, *halves, strict=True):
        assert b == b0 == b1 and x0.shape[0] == x1.shape[0] == 8
        assert (x == torch.cat([x0, x1])).all() and (y == torch.cat([y0, y1])).all()
    resumed = list(train_batches(train, 16, seed=3, epoch=1, start=5, rank=1, world=2))
    assert [b for b, _ in resumed] == [b for b, _ in halves[1][5:]]
    assert all((a[1][0] == b[1][0]).all() for a, b in zip(resumed, halves[1][5:], strict=True))
    # evaluation: every sample exactly once over the ranks, with the same number of rounds each
    val = load_splits(spec.data, data_options(spec)).val
    seen = [x for r in (0, 1) for x, _, _ in eval_batches(val, 64, r, 2)]
    assert sum(x.shape[0] for x in seen) == len(val)
    assert eval_rounds(val, 64, 2) == -(-len(list(eval_batches(val, 64))) // 2)


def test_nproc_must_split_the_batch(tmp_path):
    spec = quick_spec(tmp_path, train={"nproc": 3})
    result = run(tmp_path, "submit", str(spec))
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "train.nproc" in result.stderr
    assert not (tmp_path / "root").exists()


def test_every_ranks_rng_is_in_the_checkpoint(reference2_job):
    last = max((reference2_job / "checkpoints").iterdir())
    rng = load_file(str(last / "rng.safetensors"))
    assert set(rng) == {"rng.torch", "rng.rank1.torch"}
    assert not (rng["rng.torch"] == rng["rng.rank1.torch"]).all()  # each rank has its own stream
    assert "rng_ranks" in json.loads((last / "trainer_state.json").read_text())


def test_random_kills_of_one_rank_restart_the_group_bit_identical(reference2, tmp_path):
    spec = quick_spec(tmp_path, train=TWO)
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    rng = random.Random(11)
    killed = []
    for _ in range(3):
        attempt = running_trainer(job, after=len(state(job).get("attempts") or []) - 1, submit=proc)
        if attempt is None:
            break
        wait_for_progress(tmp_path, attempt["number"], 2)
        time.sleep(rng.uniform(0.0, 1.2))
        rank = rng.choice([0, 1])
        try:
            ranks(attempt["pid"])[rank].kill()
        except psutil.NoSuchProcess:
            break  # the job finished first
        killed.append(rank)
        running_trainer(job, after=attempt["number"], submit=proc)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert len(killed) >= 2
    doc = state(job)
    assert doc["phase"] == "completed"
    for a, rank in zip(doc["attempts"][:-1], killed, strict=False):
        assert "SIGKILL" in a["reason"] and f"rank {rank}" in a["reason"], a["reason"]
    assert final_state(job) == reference2


def test_sigterm_reaches_every_rank_and_one_preempt_checkpoint_is_committed(reference2, tmp_path):
    spec = quick_spec(tmp_path, train=TWO)
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    running_trainer(job)
    wait_for_step(job, 12)
    os.killpg(proc.pid, signal.SIGTERM)  # the orchestrator forwards it to torchrun and both ranks
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "preempt" in state(job)["attempts"][-1]["reason"]  # rank 0's own exit, not torchrun's 1
    resume_after_preemption(tmp_path, spec, job)
    assert final_state(job) == reference2


def test_a_stopped_rank_hangs_the_group_which_is_killed_and_restarted(reference2, tmp_path):
    spec = quick_spec(tmp_path, train=TWO, run={"heartbeat_timeout_s": 8})
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    attempt = running_trainer(job)
    wait_for_progress(tmp_path, attempt["number"], 3)
    stopped = ranks(attempt["pid"])[1]
    stopped.send_signal(signal.SIGSTOP)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    first = state(job)["attempts"][0]
    assert first["reason"].startswith("hung"), first
    assert not psutil.pid_exists(stopped.pid) or stopped.status() == psutil.STATUS_ZOMBIE
    # a different heartbeat timeout is not a training field: the result is the reference's
    assert final_state(job) == reference2


def test_nproc_is_a_training_field_and_old_jobs_keep_their_hash(completed, tmp_path):
    import yaml

    spec = copy_of(completed, tmp_path)  # trained to completion by submit
    stored = job_dir(spec) / "job.yaml"
    raw = yaml.safe_load(stored.read_text())
    del raw["train"]["nproc"]  # as a version before train.nproc stored it
    stored.write_text(yaml.safe_dump(raw))
    again = run(tmp_path, "submit", str(spec))
    assert again.returncode == 0 and "completed already" in again.stderr, again.stderr
    other = run(tmp_path, "submit", str(spec), "--set", "train.nproc=2")
    assert other.returncode == 2 and "train.nproc" in other.stderr, other.stderr


def test_micro_batches_compose_with_two_processes_up_to_float_summation_order(tmp_path):
    """Two processes, each in micro-batches of 4 of its 8 samples, against one process taking
    the whole batch of 16 at once: the same optimizer steps, up to the order of float sums (no
    dropout: its masks are drawn per micro-batch and per rank). Measured: validation and test
    MSE within 3e-7 of each other (relative); bounded at 1e-5. Parameters are not compared:
    Adam turns the rounding noise of gradients that are zero in exact arithmetic (the key
    projection's bias under softmax) into full-size steps."""
    (tmp_path / "one").mkdir()
    one = quick_spec(tmp_path / "one", model={"dropout": 0.0})
    two = quick_spec(tmp_path, name="two", model={"dropout": 0.0}, train={**TWO, "micro_batch_size": 4})
    for spec in (one, two):
        result = run(tmp_path, "submit", str(spec))
        assert result.returncode == 0, result.stderr
    a, b = (json.loads((job_dir(s) / "results.json").read_text()) for s in (one, two))
    assert a["global_step"] == b["global_step"] and a["best_step"] == b["best_step"]
    for x, y in ((a["val_loss"], b["val_loss"]), (a["test"]["mse"], b["test"]["mse"])):
        assert abs(x - y) <= 1e-5 * abs(x)
    plan = state(job_dir(two))["attempts"][0]["memory_plan"]
    assert (plan["micro_batch_size"], plan["batch_per_process"]) == (4, 8)
