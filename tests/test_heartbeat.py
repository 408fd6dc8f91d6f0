"""The heartbeat's keepalive: a long blocking call beats, but only for a bounded time."""

from __future__ import annotations

import json
import time

from tests.cli import wait_until
from tests.clocks import ManualClock
from timellm_job.trainer.reporting import HeartbeatWriter


def test_keepalive_beats_during_a_long_call_then_falls_silent_after_its_limit(tmp_path):
    path = tmp_path / "heartbeat.json"
    clock = ManualClock()  # time passes when the test says so; the keep-alive ticks every 10 ms
    beat = HeartbeatWriter(str(path), interval=0.5, clock=clock, keepalive_every_s=0.01)

    def written_at() -> float:
        return json.loads(path.read_text())["time"]

    beat.beat(force=True, phase="training")
    with beat.keepalive(limit_s=2.5, what="checkpoint write"):
        clock.now += 2.2  # a long call, within the limit: still beating, saying why
        wait_until(lambda: written_at() == clock.now, "a keep-alive beat", timeout=30, poll=0.01)
        assert json.loads(path.read_text())["busy"] == "checkpoint write"
        clock.now += 2.5  # past the limit: silence, so a call stuck for good reads as a hang
        time.sleep(0.05)  # a tick that read the clock just before it moved has written by now
        last = written_at()
        time.sleep(0.2)  # twenty keep-alive ticks: none beats
        assert written_at() == last
    doc = json.loads(path.read_text())
    assert doc["busy"] is None and doc["phase"] == "training" and doc["time"] == clock.now


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
