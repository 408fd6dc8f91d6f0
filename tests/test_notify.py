"""A word when a runtime dies (orchestrator.notify): webhooks told of every phase change, a
dead-man's switch pinged while the job runs, and a notifier that is slow, down or failing never
slows or harms the job. Against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import logging
import threading

import pytest
import yaml

from tests import servers
from tests.cli import run, state, wait_until
from tests.jobfiles import final_state, job_dir, quick_spec
from timellm_job.jobs import Attempt, JobStatus, Phase, SpecError, load_spec
from timellm_job.orchestrator.notify import Notifier
from timellm_job.orchestrator.redaction import redacted_yaml


class Recorder:
    """An HTTP server on 127.0.0.1 that records every request; ``status`` is what it answers,
    and while ``hold`` is clear it answers nothing (a notifier that hangs)."""

    def __init__(self, status: int = 200):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.status, self.hold = status, threading.Event()
        self.hold.set()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: dict | None) -> None:
                recorder.hold.wait(60)
                recorder.requests.append((self.command, self.path, body))
                self.send_response(recorder.status)
                self.end_headers()

            def do_GET(self):  # noqa: N802 - http.server's name
                self._answer(None)

            def do_POST(self):  # noqa: N802
                assert self.headers["Content-Type"] == "application/json"
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self) -> list[dict]:
        return [body for method, _, body in self.requests if method == "POST"]

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET"]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def _status(phase: Phase, attempts: int = 1, reason: str | None = None) -> JobStatus:
    return JobStatus(name="quick", phase=phase, reason=reason, global_step=7, total_steps=20,
                     attempts=[Attempt(number=n + 1, started_at=0.0) for n in range(attempts)])


def _closed_port() -> str:
    return f"http://127.0.0.1:{servers.free_port()}/hook"  # nothing listens there


def test_every_phase_change_is_posted_with_the_contracts_fields(recorder):
    n = Notifier("quick", [f"{recorder.url}/hook"], None, 60)
    for status in (_status(Phase.RUNNING), _status(Phase.RUNNING), _status(Phase.RESTARTING, reason="killed"),
                   _status(Phase.RUNNING, attempts=2), _status(Phase.COMPLETED, attempts=2)):
        n.changed(status)
    n.close()
    posts = recorder.posts()
    assert [p["phase"] for p in posts] == ["running", "restarting", "running", "completed"]  # no repeat
    for p in posts:
        assert {"job", "phase", "reason", "global_step", "total_steps"} <= set(p) and p["job"] == "quick"
        assert p["text"] == p["content"] and p["phase"] in p["text"]  # Slack's and Discord's field
    assert posts[1]["reason"] == "killed" and posts[1]["global_step"] == 7 and posts[1]["total_steps"] == 20
    assert posts[2]["attempt"] == 2


def test_the_dead_mans_switch_starts_pings_and_fails_in_healthchecks_convention(recorder):
    n = Notifier("quick", [], f"{recorder.url}/hc", every_s=0.05)
    n.changed(_status(Phase.RUNNING))
    wait_until(lambda: recorder.gets().count("/hc") >= 3, "three pings while the job runs", timeout=30)
    n.changed(_status(Phase.RESTARTING))
    n.changed(_status(Phase.RUNNING, attempts=2))
    n.changed(_status(Phase.FAILED, attempts=2, reason="a crash loop"))
    n.close()
    pinged = recorder.gets()
    assert pinged.count("/hc/start") == 2 and pinged.count("/hc/fail") == 1 and pinged.count("/hc") >= 3
    after = len(recorder.gets())
    threading.Event().wait(0.3)  # six ping intervals after the job ended: none
    assert len(recorder.gets()) == after


def test_a_notifier_that_hangs_is_down_or_fails_never_holds_or_harms_the_job(recorder, caplog):
    hanging, failing = Recorder(), Recorder(status=500)
    hanging.hold.clear()  # answers nothing until released
    try:
        n = Notifier("quick", [f"{hanging.url}/a", f"{failing.url}/b", _closed_port(), f"{recorder.url}/c"],
                     f"{hanging.url}/hc", every_s=0.05)
        with caplog.at_level(logging.WARNING, logger="timellm_job"):
            for phase in (Phase.RUNNING, Phase.RESTARTING, Phase.RUNNING):
                n.changed(_status(phase))  # returns while the hanging server holds its first request
            assert not hanging.requests  # still held: the calls above did not wait for it
            hanging.hold.set()
            wait_until(lambda: len(recorder.posts()) == 3, "the healthy webhook's three posts", timeout=60)
            n.close()
        warned = [r.getMessage() for r in caplog.records if "notifier" in r.getMessage()]
        assert len(warned) == 2, warned  # the one answering 500 and the one down: said once each
        assert all("/<redacted> failed" in w and "/b" not in w and "/hook" not in w for w in warned), warned
    finally:
        hanging.close()
        failing.close()


def test_notify_fields_are_checked_and_never_stored_in_the_clear(tmp_path):
    bad = quick_spec(tmp_path, run={"notify": ["hooks.slack.com/services/T0/B0/secret"]})
    with pytest.raises(SpecError, match=r"run\.notify"):
        load_spec(bad)
    bad = quick_spec(tmp_path, run={"healthcheck_url": "ftp://hc-ping.com/uuid"})
    with pytest.raises(SpecError, match=r"run\.healthcheck_url"):
        load_spec(bad)
    good = load_spec(quick_spec(tmp_path, run={"notify": ["https://hooks.slack.com/services/T0/B0/secret"],
                                               "healthcheck_url": "https://hc-ping.com/0f3c-uuid/"}))
    stored = redacted_yaml(good)
    assert "secret" not in stored and "0f3c" not in stored
    run_doc = yaml.safe_load(stored)["run"]
    assert run_doc["notify"] == ["https://hooks.slack.com/<redacted>"]
    assert run_doc["healthcheck_url"] == "https://hc-ping.com/<redacted>"


@pytest.mark.slow
def test_a_job_with_failing_notifiers_completes_as_without_them_and_its_webhook_hears_each_phase(
        reference, recorder, tmp_path):
    failing = Recorder(status=500)
    try:
        spec = quick_spec(tmp_path, run={"notify": [f"{recorder.url}/hook", f"{failing.url}/hook", _closed_port()],
                                         "healthcheck_url": f"{recorder.url}/hc", "healthcheck_every_s": 0.5})
        result = run(tmp_path, "submit", str(spec))
        assert result.returncode == 0, result.stderr
    finally:
        failing.close()
    job = job_dir(spec)
    assert state(job)["phase"] == "completed" and final_state(job) == reference
    phases = [p["phase"] for p in recorder.posts()]
    assert phases[0] == "running" and phases[-1] == "completed", phases
    assert "/hc/start" in recorder.gets() and "/hc" in recorder.gets()
    assert "notifier http://127.0.0.1:" in result.stderr and "/<redacted> failed" in result.stderr
    stored = (job / "job.yaml").read_text()
    assert "/hook" not in stored and "/hc" not in stored  # the stored spec keeps no secret path
