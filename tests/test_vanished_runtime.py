"""A runtime that vanishes without a word (a Colab disconnect: every process SIGKILLed at once):
the status says ``interrupted``, never ``running``, the trainer does not outlive its
orchestrator, and the next submit takes the lease of the dead pid at once, closes the attempt
the dead runtime left open as ``lost`` and ends bit for bit where one uninterrupted run ends.
The restart budget is per submit. Where an attempt resumed is on record as soon as its trainer
says so."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli import (
    SLOW,
    run,
    running_trainer,
    start,
    state,
    wait_for_checkpoint,
    wait_for_new_ground,
    wait_for_step,
    wait_until,
)
from tests.jobfiles import final_state, job_dir, quick_spec
from timellm_job.jobs import load_spec, spec_hash
from timellm_job.orchestrator.attempt import TrainerProcess
from timellm_job.orchestrator.jobstate import JobState
from timellm_job.orchestrator.supervisor import Supervisor
from timellm_job.storage import job_store

pytestmark = pytest.mark.slow


def test_a_vanished_runtime_reads_interrupted_and_its_attempt_is_closed_as_lost(reference, tmp_path):
    spec = quick_spec(tmp_path)
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    attempt = running_trainer(job)
    wait_for_new_ground(tmp_path, job, attempt["number"], steps=5)
    wait_for_step(job, 5)  # a state flush with the heartbeat's step (the state is what survives)
    wait_for_checkpoint(job, "step", proc)  # a committed checkpoint: the next runtime resumes, not restarts
    live = run(tmp_path, "status", str(spec), "--json")
    assert json.loads(live.stdout)["phase"] == "running" and "Warning" not in live.stderr, live.stderr
    os.killpg(proc.pid, signal.SIGKILL)  # everything dies at once: nobody writes the state
    proc.wait()
    wait_until(lambda: not psutil.pid_exists(attempt["pid"]) or psutil.Process(attempt["pid"]).status() == "zombie",
               "the trainer to die with its orchestrator", timeout=10, poll=0.05)
    assert state(job)["phase"] == "running"  # what the dead runtime left behind...
    shown = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)
    assert shown["phase"] == "interrupted" and shown["lease"] is None  # ...is not what status says
    assert "orchestrator vanished" in shown["reason"] and "last heartbeat" in shown["reason"]
    table = run(tmp_path, "status", str(spec)).stdout
    assert "interrupted" in table and "running" not in table
    result = run(tmp_path, "submit", str(spec))
    assert result.returncode == 0, result.stderr
    doc = state(job)
    lost = doc["attempts"][0]
    assert lost["reason"].startswith("lost: orchestrator gone") and lost["ended_at"] is not None
    assert f"at step {lost['end_step']}" in lost["reason"] and lost["end_step"] >= 5
    assert doc["restarts"] == 0, [(a.get("exit_code"), a.get("reason")) for a in doc["attempts"]]  # a lost runtime is not a restart
    assert doc["phase"] == "completed" and final_state(job) == reference
    shown = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)  # goodput: where the time went
    good, attempts = shown["goodput"], shown["attempts"]
    assert math.isclose(sum(good["parts"].values()), good["wall_s"], rel_tol=0.02)
    assert good["wall_s"] >= attempts[-1]["ended_at"] - attempts[0]["started_at"] - 0.01
    assert min(good["parts"][k] for k in ("startup_s", "training_s", "eval_s")) > 0 and 0 < good["share"] < 1
    for a in attempts:
        assert math.isclose(sum(a["goodput"]["parts"].values()), a["goodput"]["wall_s"], rel_tol=0.02)
    again = lost["end_step"] - attempts[1]["start_step"]  # steps of the lost runtime trained again
    assert (attempts[1]["goodput"]["parts"]["retrained_s"] > 0) == (again > 0)
    assert "goodput" in run(tmp_path, "status", str(spec)).stdout
    # TensorBoard (the tensorboard extra): the job's event files, read by TensorBoard itself
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from timellm_job.storage.metrics_log import read_metrics

    records = read_metrics(job_store(str(tmp_path / "root"), "quick"))
    board = EventAccumulator(str(job / "tb"))
    board.Reload()
    losses = {e.step: e.value for e in board.Scalars("train/loss")}  # a restart's steps replace the lost ones
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}  # the newest of each step
    assert sorted(losses) == list(range(1, doc["global_step"] + 1))
    assert all(math.isclose(losses[s], logged[s], rel_tol=1e-6) for s in losses)
    assert {e.step for e in board.Scalars("val/mse")} == {r["step"] for r in records if "val_loss" in r}
    assert math.isclose(board.Scalars("test/mse")[-1].value, json.loads((job / "results.json").read_text())["test"]["mse"],
                        rel_tol=1e-6)
    started = [t.tensor_proto.string_val[0].decode() for t in board.Tensors("attempts")]
    assert len(started) == 2 and started[1].startswith("attempt 2 started at step") and "resumed from" in started[1]


def test_a_second_ctrl_c_stops_at_once_and_says_no_checkpoint_was_written(tmp_path):
    spec = quick_spec(tmp_path, storage={"save_steps": 1000})  # no step checkpoint: only the preempt one
    job = job_dir(spec)
    # each checkpoint file takes 3 s to write: the preempt checkpoint is still being written when
    # the second Ctrl-C comes
    proc = start(tmp_path, "submit", str(spec), TIMELLM_JOB_TEST_STEP_DELAY_S="0.08", TIMELLM_JOB_TEST_WRITE_DELAY_S="3")
    attempt = running_trainer(job)
    wait_for_new_ground(tmp_path, job, attempt["number"], steps=3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # two signals sent at once would reach the orchestrator as one
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    doc = state(job)
    assert doc["attempts"][-1]["reason"].startswith("stopped at once by a second signal: no checkpoint written; ")
    assert "the newest checkpoint is" in doc["attempts"][-1]["reason"] or "no checkpoint is committed" in \
        doc["attempts"][-1]["reason"]
    assert doc["phase"] == "preempted" and "no checkpoint written" in doc["reason"]
    assert not any(c["kind"] == "preempt" for c in doc["checkpoints"])
    follow = run(tmp_path, "logs", str(spec), "-f", timeout=60)  # the job is over: -f returns
    assert follow.returncode == 0


def test_the_restart_budget_is_enforced_per_submit(tmp_path):
    spec = quick_spec(tmp_path, run={"max_restarts": 1, "crash_loop_limit": 10})
    first = run(tmp_path, "submit", str(spec), TIMELLM_JOB_TEST_FAIL_AT_STEP="5")
    assert first.returncode == 1
    doc = state(job_dir(spec))
    assert "restart budget spent (1) in this submit" in doc["reason"] and len(doc["attempts"]) == 2
    again = run(tmp_path, "submit", str(spec), TIMELLM_JOB_TEST_FAIL_AT_STEP="5")
    assert again.returncode == 1
    doc = state(job_dir(spec))
    assert len(doc["attempts"]) == 4 and doc["restarts"] == 2  # the budget came back with the submit


def test_a_preempt_checkpoint_that_would_not_fit_the_grace_period_is_not_started_and_says_so(tmp_path):
    """Issue 15: a commit of this state took longer than the grace period allows (here every
    checkpoint file takes 4 s to write and the grace period is 4 s), so a preempt checkpoint
    would be killed half-way: the trainer does not start one, exits 143 at once, and the attempt
    and the job say why and name the newest whole checkpoint. (Files are written four at a time:
    at 4 s a file the best checkpoint takes over 4 s.)"""
    spec = quick_spec(tmp_path, storage={"save_steps": 1000}, train={"epochs": 2},
                      run={"grace_period_s": 4, "backbone_cache": False})  # (no slow backbone cache write)
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), TIMELLM_JOB_TEST_STEP_DELAY_S="0.3", TIMELLM_JOB_TEST_WRITE_DELAY_S="4")
    attempt = running_trainer(job)
    wait_for_checkpoint(job, "best", proc)  # the best after epoch 0 (slow to write)
    _wait = time.time() + 60
    while (json.loads((tmp_path / "work").joinpath(next(os.walk(tmp_path / "work"))[1][0],
                                                   f"heartbeat-{attempt['number']:03d}.json").read_text())
           .get("epoch", 0) < 1):
        assert time.time() < _wait
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    doc = state(job)
    best = [c["id"] for c in doc["checkpoints"] if c["kind"] == "best"]
    reason = doc["attempts"][-1]["reason"]
    assert reason.startswith("preempted: no preempt checkpoint: the newest commit of this state took"), reason
    assert "more than the 4 s grace period allows" in reason and f"the newest whole checkpoint is {best[0]}" in reason
    assert doc["phase"] == "preempted" and "no preempt checkpoint" in doc["reason"]
    assert not any(c["kind"] == "preempt" for c in doc["checkpoints"])


TRAINER = """
import os, sys, time
from pathlib import Path
from timellm_job.trainer.reporting import HeartbeatWriter
beat, go = HeartbeatWriter(os.environ["TIMELLM_JOB_HEARTBEAT"], interval=0), Path(sys.argv[1])
beat.beat(force=True, phase="starting", step=0)
while not (go / "resume").exists():
    time.sleep(0.05)
beat.beat(force=True, phase="training", resumed_from={"id": "000000014-step", "step": 14}, start_step=14, step=14,
          skipped=["000000021-step: model.safetensors: sha256 does not match the manifest"])
while not (go / "end").exists():
    time.sleep(0.05)
"""


def test_where_an_attempt_resumed_is_on_record_at_once_not_at_the_next_periodic_flush(tmp_path):
    """A runtime can vanish seconds after its trainer resumed (a Colab disconnect): state.json
    must already say which checkpoint the attempt resumed from and which it skipped, not wait
    for the next periodic flush (the record a new runtime closes the attempt with)."""
    spec_path = quick_spec(tmp_path)
    spec, folder = load_spec(spec_path), job_dir(spec_path)
    job = job_store(str(folder.parent), folder.name)
    record = JobState(job, spec.name, spec_hash(spec))
    supervisor = Supervisor(spec, job, record, None, 60.0, lambda n, hint: [], tmp_path)
    repo = str(Path(__file__).resolve().parents[1])
    proc = TrainerProcess([sys.executable, "-c", TRAINER, str(tmp_path)], tmp_path, 1, env={"PYTHONPATH": repo})
    try:
        record.begin_attempt(proc.pid, "here", proc.started_at)
        record.flush()
        def beat_says(field: str, value) -> bool:
            assert not proc.exited.is_set(), proc.log_path.read_text()
            return getattr(proc.heartbeat(), field, None) == value

        wait_until(lambda: beat_says("activity", "starting"), "the trainer's first beat", timeout=60, poll=0.05)
        supervisor._fold(proc)  # a beat with no resume point: nothing to put on record yet
        assert state(folder)["attempts"][0].get("resumed_from") is None
        (tmp_path / "resume").touch()
        wait_until(lambda: beat_says("resume_known", True), "a beat with the resume point", timeout=60, poll=0.05)
        supervisor._fold(proc)  # within the flush interval of the flush above: written at once all the same
        attempt = state(folder)["attempts"][0]
        assert attempt["resumed_from"] == {"id": "000000014-step", "step": 14} and attempt["start_step"] == 14
        assert attempt["skipped_checkpoints"] == ["000000021-step: model.safetensors: sha256 does not match the manifest"]
    finally:
        (tmp_path / "end").touch()
        proc.exited.wait(30)

