"""``stop`` from another process (through storage, no signal to send: the job may run on another
machine) and ``list`` of every job under a root, with the job on moto S3; the other machine's
clock is two minutes ahead, and the second stop request arrives torn."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests import servers
from tests.cli import SLOW, run, start, wait_for_progress
from tests.jobfiles import final_state_of, quick_spec
from timellm_job.storage import job_store, list_checkpoints
from timellm_job.storage.documents import read_json

pytestmark = pytest.mark.slow


def test_stop_from_another_process_preempts_and_list_shows_the_jobs(reference, s3_server, tmp_path):
    """Issue 23, item 7: a host whose clock was 120 s ahead read a live job as dead (list, stop);
    item 8: a truncated stop.json made the supervisor's tick raise, submit exit 1 and the trainer
    die without a preempt checkpoint, state.json left running. Both are stop requests here."""
    root = f"s3://{servers.S3_BUCKET}/stop-{uuid.uuid4().hex[:8]}"
    options = servers.s3_options(s3_server)
    spec = quick_spec(tmp_path, storage={"root": root, "options": options})
    store = job_store(root, "quick", options)
    idle = run(tmp_path, "stop", str(spec))
    assert idle.returncode == 1 and "nothing to stop" in idle.stderr  # no submit runs it yet
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    wait_for_progress(tmp_path, 1, 5)  # the trainer's own heartbeat, on this machine
    while not (read_json(store, "state.json") or {}).get("attempts"):  # and the state, in the bucket
        assert proc.poll() is None
        time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": s3_server.url}
    ahead = {**env, "TIMELLM_TEST_CLOCK_OFFSET_S": "120"}  # the other machine's clock is off
    listed = json.loads(run(tmp_path, "list", "--root", root, "--json", **ahead).stdout)
    assert [(j["name"], j["phase"]) for j in listed] == [("quick", "running")] and listed[0]["host"]
    asked = run(tmp_path, "stop", str(spec), **ahead)
    assert asked.returncode == 0, asked.stderr
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "stop requested from" in out
    # the step it stopped at is committed once: a preempt checkpoint, or that step's own when
    # the stop came at a step being saved anyway
    committed = list_checkpoints(store).committed
    stopped = [m for m in committed if m.kind in ("preempt", "step") and m.step == committed[0].step]
    assert len(stopped) == 1 and len([m for m in committed if m.kind == "preempt"]) <= 1
    listed = json.loads(run(tmp_path, "list", "--root", root, "--json", **env).stdout)
    assert listed[0]["phase"] == "preempted" and listed[0]["global_step"] == stopped[0].step
    assert not store.exists("stop.json")  # the request was taken
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    wait_for_progress(tmp_path, 2, 3)
    store.replace("stop.json", b'{"requested_at": 17964')  # torn on its way (or written by hand)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stop request cannot be read" in out, out
    doc = read_json(store, "state.json")
    assert doc["phase"] == "preempted" and doc["attempts"][-1]["ended_at"] is not None
    assert not store.exists("stop.json")
    assert run(tmp_path, "submit", str(spec)).returncode == 0
    assert final_state_of(store) == reference
