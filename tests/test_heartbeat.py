"""The heartbeat's keepalive: a long blocking call beats, but only for a bounded time."""

from __future__ import annotations

import json
import time

from timellm_job.trainer.reporting import HeartbeatWriter


def _age(path) -> float:
    return time.time() - json.loads(path.read_text())["time"]


def test_keepalive_beats_during_a_long_call_then_falls_silent_after_its_limit(tmp_path):
    path = tmp_path / "heartbeat.json"
    beat = HeartbeatWriter(str(path), interval=0.5)
    beat.beat(force=True, phase="training")
    with beat.keepalive(limit_s=2.5, what="checkpoint write"):
        time.sleep(2.2)
        assert _age(path) < 1.5  # still beating, saying why
        assert json.loads(path.read_text())["busy"] == "checkpoint write"
        time.sleep(2.5)
        assert _age(path) > 1.5  # past the limit: silence, so a call stuck for good reads as a hang
    doc = json.loads(path.read_text())
    assert doc["busy"] is None and doc["phase"] == "training" and _age(path) < 0.5


def test_without_a_heartbeat_file_keepalive_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = HeartbeatWriter(None)
    with writer.keepalive(limit_s=1, what="x"):
        writer.beat(force=True, step=3)
    assert writer.store is None and list(tmp_path.iterdir()) == []  # nothing written anywhere here
    assert writer.doc.step == 3  # the beat is kept in memory all the same


def test_a_phase_change_clears_the_previous_phases_batch_counts(tmp_path):
    """Issue 23, item 17: the progress line showed 'testing 11/11' when the test had 24 batches:
    the validation's counts lived on into the test until its first (throttled) batch beat."""
    path = tmp_path / "heartbeat.json"
    beat = HeartbeatWriter(str(path), interval=60)
    beat.beat(force=True, phase="validating")
    beat.beat(force=True, eval_batch=11, eval_batches=11)
    beat.beat(force=True, phase="testing")
    doc = json.loads(path.read_text())
    assert doc["phase"] == "testing" and "eval_batch" not in doc and "eval_batches" not in doc
    beat.beat(eval_batch=1, eval_batches=24)  # throttled: not written yet, but kept for the next
    beat.beat(force=True, phase="testing")  # the same phase: the counts stay
    assert json.loads(path.read_text())["eval_batches"] == 24
