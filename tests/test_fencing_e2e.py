"""A second runtime on a job whose first runtime stalled (issue 15): the lease expires under the
stalled orchestrator, a second `submit` takes the next generation, the first runtime's trainer
(still training) is fenced at its next commit and exits 3 without committing, the stalled
orchestrator wakes up fenced and exits 3 writing nothing, and the job ends bit for bit where one
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
from cli import SLOW, run, running_trainer, start, state, wait_for_new_ground
from jobfiles import final_state, job_dir, quick_spec

pytestmark = pytest.mark.slow
TTL = "4"


def _lease_docs(job) -> dict[int, dict]:
    folder = job / "lease"
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.exists() else {}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stalled_runtime_is_fenced_by_the_next_and_the_job_ends_bit_identical(reference, tmp_path):
    spec = quick_spec(tmp_path)
    job = job_dir(spec)
    first = start(tmp_path, "submit", str(spec), TIMELLM_JOB_LEASE_TTL_S=TTL, **SLOW)
    attempt = running_trainer(job)
    wait_for_new_ground(tmp_path, job, attempt["number"], steps=3)
    os.kill(first.pid, signal.SIGSTOP)  # the orchestrator stalls; its trainer trains on
    try:
        deadline = time.time() + 60
        while _lease_docs(job)[1]["expires_at"] > time.time():
            assert time.time() < deadline, "the stalled orchestrator's lease never expired"
            time.sleep(0.2)
        second = start(tmp_path, "submit", str(spec), TIMELLM_JOB_LEASE_TTL_S=TTL, **SLOW)
        deadline = time.time() + 120
        while 2 not in _lease_docs(job):
            assert time.time() < deadline and second.poll() is None, "the second runtime took no lease"
            time.sleep(0.1)
        taken_at = _lease_docs(job)[2]["acquired_at"]
        deadline = time.time() + 300
        while not _gone(attempt["pid"]):  # fenced at its next commit (save_steps 7)
            assert time.time() < deadline, "the first runtime's trainer was never fenced"
            time.sleep(0.2)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 3, out
    assert "fenced" in out
    log = (tmp_path / "work").rglob("attempt-001.log")
    assert any("fenced" in p.read_text() and "stops without writing" in p.read_text() for p in log)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    doc = state(job)
    assert doc["phase"] == "completed" and doc["lease"] is None  # the fenced runtime wrote nothing over it
    assert doc["attempts"][0]["reason"].startswith("lost: orchestrator gone")
    assert final_state(job) == reference
    for manifest in (job / "checkpoints").glob("*/manifest.json"):  # no commit of generation 1 after the takeover
        m = json.loads(manifest.read_text())
        assert m["lease_generation"] in (1, 2)
        if m["lease_generation"] == 1:
            assert m["created_at"] <= taken_at, m["id"]
    shown = run(tmp_path, "status", str(spec), "--json")
    assert json.loads(shown.stdout)["phase"] == "completed"
