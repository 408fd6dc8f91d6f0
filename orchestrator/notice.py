"""Opt-in preemption notices: poll a cloud metadata endpoint and react before the VM's signal.

GCE answers ``TRUE`` at ``instance/preempted`` once the VM is being preempted; AWS answers
200 with a JSON action at ``spot/instance-action`` once a spot interruption is scheduled (404
before). The URL is configurable (``run.preemption_notice.url``); tests point it at a fake
server on 127.0.0.1. A poll that fails (no metadata server) is ignored.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable

DEFAULT_URLS = {
    "gce": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
}


def is_notice(provider: str, status: int, body: str) -> bool:
    if status != 200:
        return False
    return body.strip().upper() == "TRUE" if provider == "gce" else bool(body.strip())


class NoticeWatcher:
    def __init__(self, provider: str, url: str | None, interval_s: float, on_notice: Callable[[str], None]):
        self.provider, self.url = provider, url or DEFAULT_URLS[provider]
        self.interval_s, self.on_notice = interval_s, on_notice
        self.stopped = threading.Event()

    def poll(self) -> bool:
        req = urllib.request.Request(self.url, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return is_notice(self.provider, resp.status, resp.read().decode(errors="replace"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            if self.poll():
                self.on_notice(f"{self.provider} metadata at {self.url} announced a preemption")
                return

    def start(self) -> NoticeWatcher:
        threading.Thread(target=self._run, name="preemption-notice", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()
