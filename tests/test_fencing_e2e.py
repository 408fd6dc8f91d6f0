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
from cli import REPO, SLOW, run, running_trainer, start, state, wait_for_new_ground
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


def test_two_runtimes_on_a_store_without_create_only_writes_the_one_whose_lease_stands_goes_on(reference, tmp_path):
    """Drive (issue 15): two runtimes see one folder through mounts that sync late, so the second
    may write the same lease generation as the first. Built here on fsspec's ``dir://`` store (no
    create-only write: the unsafe single-writer path) with a second process that writes the
    first's generation under its own name, as a sync conflict resolved in its favour would. The
    first runtime's trainer is fenced at its next commit and exits 3, its submit exits 3 writing
    nothing; once the second runtime is gone, a submit takes the next generation and the job
    ends bit for bit where one uninterrupted run ends."""
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    (tmp_path / "store" / "shared").mkdir(parents=True)
    raw["storage"].update({"root": "dir://shared", "unsafe_single_writer": True, "options": {
        "path": str(tmp_path / "store"), "target_protocol": "file", "target_options": {"auto_mkdir": True}}})
    spec = tmp_path / "drive.yaml"
    spec.write_text(yaml.safe_dump(raw))
    job = tmp_path / "store" / "shared" / "quick"
    first = start(tmp_path, "submit", str(spec), TIMELLM_JOB_LEASE_TTL_S=TTL, **SLOW)
    attempt = running_trainer(job)
    wait_for_new_ground(tmp_path, job, attempt["number"], steps=3)
    generation = max(_lease_docs(job))
    claim = ("import json, os, socket, sys, time; from storage import job_store; from storage import lease as L; "
             "job = job_store('dir://shared', 'quick', json.loads(sys.argv[1])); "
             "me = L.Lease('second-runtime', socket.gethostname(), os.getpid(), time.time(), time.time() + 60, "
             "int(sys.argv[2])); job.replace(f'lease/{me.generation:010d}.json', me.to_bytes()); "
             "L.check(job, me.generation, me.owner); print('holds', me.generation)")
    second = subprocess.run([sys.executable, "-c", claim, json.dumps(raw["storage"]["options"]), str(generation)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.strip() == f"holds {generation}", second.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 3 and "fenced" in out, out
    assert json.loads((job / f"lease/{generation:010d}.json").read_text())["owner"] == "second-runtime"
    assert run(tmp_path, "submit", str(spec), TIMELLM_JOB_LEASE_TTL_S=TTL).returncode == 0  # its pid is gone
    assert max(_lease_docs(job)) == generation + 1
    assert final_state(job) == reference
