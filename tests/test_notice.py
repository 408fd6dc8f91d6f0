"""Preemption-notice watchers against fake metadata servers on 127.0.0.1 that behave like the
real ones: GCE's flavor header, AWS IMDSv2's session tokens (401 without one, 404 until an
interruption is scheduled), Azure's Scheduled Events; and a watcher that keeps failing."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from timellm_job.orchestrator.notice import FAILING_AFTER, NoticeWatcher


class Fake:
    """A metadata server whose answers a test changes; records the requests it got."""

    def __init__(self, handler):
        outer = self
        self.requests: list[tuple[str, str, dict]] = []
        self.state: dict = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                outer.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, body = handler(outer, self.command, self.path, self.headers)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_PUT = _answer

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def imds_v2(fake, method, path, headers):
    """IMDSv2 as documented: tokens from PUT /latest/api/token (TTL header required); every
    other request without a valid token answers 401; no interruption scheduled: 404."""
    if path == "/latest/api/token":
        if method != "PUT" or not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return 400, ""
        fake.state["issued"] = fake.state.get("issued", 0) + 1
        return 200, f"token-{fake.state['issued']}"
    if headers.get("X-aws-ec2-metadata-token") != f"token-{fake.state.get('issued')}" or fake.state.get("expire"):
        fake.state["expire"] = False
        return 401, ""
    if path == "/latest/meta-data/spot/instance-action":
        action = fake.state.get("action")
        return (200, json.dumps({"action": action, "time": "2026-11-27T14:00:00Z"})) if action else (404, "")
    return 404, ""


def scheduled_events(fake, method, path, headers):
    if headers.get("Metadata") != "true":
        return 400, ""
    return 200, json.dumps({"DocumentIncarnation": 1, "Events": fake.state.get("events", [])})


def test_aws_watcher_speaks_imdsv2_and_refreshes_an_expired_token():
    fake = Fake(imds_v2)
    try:
        watcher = NoticeWatcher("aws", f"{fake.base}/latest/meta-data/spot/instance-action", 1, print)
        assert watcher.poll() is False and watcher.failures == 0  # 404: nothing scheduled
        assert fake.requests[0][0] == "PUT" and fake.requests[1][2]["x-aws-ec2-metadata-token"] == "token-1"
        fake.state["expire"] = True
        assert watcher.poll() is False and watcher.failures == 0 and fake.state["issued"] == 2  # refreshed
        fake.state["action"] = "terminate"
        assert watcher.poll() is True
    finally:
        fake.close()


def test_azure_watcher_fires_on_a_preempt_event_only():
    fake = Fake(scheduled_events)
    try:
        watcher = NoticeWatcher("azure", f"{fake.base}/metadata/scheduledevents?api-version=2020-07-01", 1, print)
        assert watcher.poll() is False
        fake.state["events"] = [{"EventId": "a", "EventType": "Freeze", "EventStatus": "Scheduled"}]
        assert watcher.poll() is False
        fake.state["events"].append({"EventId": "b", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                                     "Resources": ["vm"], "EventStatus": "Scheduled",
                                     "NotBefore": "Fri, 27 Nov 2026 14:00:00 GMT"})
        assert watcher.poll() is True
        assert all(h.get("metadata") == "true" for _, _, h in fake.requests)
    finally:
        fake.close()


@pytest.mark.parametrize("provider", ["gce", "aws", "azure"])
def test_a_watcher_that_keeps_failing_says_so_once_and_again_after_it_recovered(provider):
    fake = Fake(lambda f, m, p, h: (500, "") if f.state.get("down", True) else
                {"gce": (200, "FALSE"), "azure": (200, '{"Events": []}')}.get(provider) or imds_v2(f, m, p, h))
    said: list[str | None] = []
    try:
        watcher = NoticeWatcher(provider, f"{fake.base}/latest/meta-data/spot/instance-action", 1, print, said.append)
        for _ in range(FAILING_AFTER + 3):
            assert watcher.poll() is False
        assert len(said) == 1 and provider in said[0] and "failed 3 times" in said[0]
        fake.state["down"] = False
        assert watcher.poll() is False and said[-1] is None  # it answers again: the problem is cleared
    finally:
        fake.close()
