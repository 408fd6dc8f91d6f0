"""A word when a runtime dies: webhooks told of every phase change, and a dead-man's switch.

The one loss of goodput we cannot recover ourselves is the time before a person notices that a
runtime vanished. So a service outside the runtime is told:

- ``run.notify``: each URL gets a JSON POST at every phase change of the job (``job``, ``phase``,
  ``reason``, ``global_step``, ``total_steps``, ``attempt``, ``host``, ``time``, and the same in
  words as ``text`` and ``content``, which Slack's and Discord's incoming webhooks show; ntfy
  publishes the body as it is).
- ``run.healthcheck_url`` (healthchecks.io's convention): ``<url>/start`` when an attempt starts,
  ``<url>`` every ``run.healthcheck_every_s`` while the job runs, ``<url>/fail`` when it fails.
  When the runtime dies the pings stop, and the service raises the alarm.

Invariants:
- Nothing here slows or harms the job: the supervisor only puts a message on a bounded queue
  (a full queue drops the oldest); one sender thread and one pinger thread do the HTTP, each
  request within ``TIMEOUT_S``; a notifier that is slow, down or answers an error is logged once
  (its URL redacted: they are secrets) and tried again at the next message.
- ``close`` gives the last messages (the job's final phase) at most ``CLOSE_S`` to go out.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from timellm_job.jobs.status import JobStatus, Phase
from timellm_job.orchestrator.redaction import redacted_secret_url

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # one request
CLOSE_S = 5.0  # the final messages, at submit's exit
QUEUE_SIZE = 100
LIVE = (Phase.RUNNING, Phase.RESTARTING)


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes | None  # None: a GET


def send(request: Request, timeout: float = TIMEOUT_S) -> None:
    """One request; raises on a connection error, a timeout or a status >= 400."""
    headers = {"Content-Type": "application/json", "User-Agent": "timellm-job"} if request.body is not None else \
        {"User-Agent": "timellm-job"}
    req = urllib.request.Request(request.url, data=request.body, headers=headers,
                                 method="POST" if request.body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 - http(s) only (jobs.spec)
        response.read(1024)


class Notifier:
    def __init__(self, job: str, webhooks: list[str], healthcheck_url: str | None, every_s: float,
                 sender: Callable[[Request], None] = send):
        self.job, self.webhooks, self.healthcheck_url, self.every_s = job, list(webhooks), healthcheck_url, every_s
        self.sender = sender
        self.queue: queue.Queue[Request] = queue.Queue(QUEUE_SIZE)
        self.failing: set[str] = set()  # URLs whose last request failed (said once until they recover)
        self.phase: Phase | None = None
        self.attempts = 0
        self.live = threading.Event()  # pinging while the job runs
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._send_loop, name="notify-send", daemon=True)]
        if healthcheck_url:
            self.threads.append(threading.Thread(target=self._ping_loop, name="notify-ping", daemon=True))
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------------ what the supervisor calls
    def changed(self, status: JobStatus) -> None:
        """The job's status after a phase change (or an attempt's start): never blocks."""
        new_attempt = len(status.attempts) > self.attempts
        self.attempts = len(status.attempts)
        if self.healthcheck_url and new_attempt and status.phase is Phase.RUNNING:
            self._put(Request(f"{self.healthcheck_url}/start", None))
        if status.phase is self.phase and not new_attempt:
            return
        self.phase = status.phase
        (self.live.set if status.phase in LIVE else self.live.clear)()
        if self.healthcheck_url and status.phase is Phase.FAILED:
            self._put(Request(f"{self.healthcheck_url}/fail", None))
        if self.webhooks:
            body = json.dumps(self._message(status)).encode()
            for url in self.webhooks:
                self._put(Request(url, body))

    def close(self, timeout: float = CLOSE_S) -> None:
        """Let the queued messages go out for at most ``timeout`` seconds, then stop."""
        self.live.clear()
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self.closed.set()

    # ------------------------------------------------------------------ inside
    def _message(self, status: JobStatus) -> dict:
        attempt = status.attempts[-1].number if status.attempts else None
        words = f"timellm-job: job {self.job} is {status.phase.value}" + (f": {status.reason}" if status.reason else "") \
            + (f" (step {status.global_step}/{status.total_steps})" if status.total_steps else "")
        return {"job": self.job, "phase": status.phase.value, "reason": status.reason,
                "global_step": status.global_step, "total_steps": status.total_steps, "attempt": attempt,
                "host": socket.gethostname(), "time": time.time(), "text": words, "content": words}

    def _put(self, request: Request) -> None:
        while True:
            try:
                self.queue.put_nowait(request)
                return
            except queue.Full:  # a notifier far behind: the oldest message goes
                try:
                    self.queue.get_nowait()
                    self.queue.task_done()
                except queue.Empty:
                    pass

    def _deliver(self, request: Request) -> None:
        try:
            self.sender(request)
        except Exception as exc:  # noqa: BLE001 - a notifier never harms the job
            if request.url not in self.failing:
                self.failing.add(request.url)
                log.warning(f"warning: notifier {redacted_secret_url(request.url)} failed "
                            f"({type(exc).__name__}: {str(exc)[:200]}); the job goes on")
            return
        if request.url in self.failing:
            self.failing.discard(request.url)
            log.info(f"notifier {redacted_secret_url(request.url)} answers again")

    def _send_loop(self) -> None:
        while not self.closed.is_set():
            try:
                request = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(request)
            finally:
                self.queue.task_done()

    def _ping_loop(self) -> None:
        while not self.closed.wait(self.every_s):
            if self.live.is_set():
                self._deliver(Request(self.healthcheck_url, None))
