"""What the trainer tells the world while it runs: heartbeat, metrics log, progress line.

Invariants:
- The heartbeat is a small local JSON document (jobs.protocol.Heartbeat, path from
  ``ENV_HEARTBEAT``) replaced atomically at most every ``interval`` seconds and at every event;
  the orchestrator reads it through the same model. A beat names only the model's fields.
- The metrics log (storage.metrics_log) is written at every checkpoint and at exit.
- An activity change clears what belonged to the one before (an evaluation's batch counts), so a
  reader never shows ``testing 11/11`` from the validation that preceded a 24-batch test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from timellm_job.jobs.messages import duration
from timellm_job.jobs.protocol import ENV_HEARTBEAT_INTERVAL_S, Heartbeat
from timellm_job.storage.documents import write_json
from timellm_job.storage.lease import SYSTEM, Clock
from timellm_job.storage.metrics_log import MetricsLog  # noqa: F401  (the trainer's metrics log)
from timellm_job.storage.store import open_store

log = logging.getLogger(__name__)


class HeartbeatWriter:
    """The trainer's liveness. Beats come from the training thread; only around a long blocking
    call (a download, waiting for a checkpoint write) does ``keepalive`` beat from a helper
    thread, and only for a bounded time, so a call stuck for good still reads as a hang."""

    def __init__(self, path: str | None, interval: float | None = None, clock: Clock = SYSTEM,
                 keepalive_every_s: float = 1.0):
        if interval is None:  # 0 (benchmarks): a beat at every step
            interval = float(os.environ.get(ENV_HEARTBEAT_INTERVAL_S, "0.5"))
        self.interval, self.last = interval, 0.0
        self.clock, self.keepalive_every_s = clock, keepalive_every_s  # injectable: tests pass their own time
        self.store = open_store(os.path.dirname(path)) if path else None
        self.name = os.path.basename(path) if path else None
        self.doc = Heartbeat(pid=os.getpid())
        self.lock = threading.Lock()

    def beat(self, force: bool = False, **fields: Any) -> None:
        """Fold ``fields`` (Heartbeat's) in; write when forced or ``interval`` has passed."""
        with self.lock:
            self.doc.update(fields)
            now = self.clock.time()
            if self.store is None or (not force and now - self.last < self.interval):
                return
            self.last = now
            self.doc.time = now
            write_json(self.store, self.name, self.doc.to_doc(), durable=False)  # atomic; no fsync on the hot path

    @contextlib.contextmanager
    def keepalive(self, limit_s: float, what: str, measure=None):
        """Beat every second while the block runs, for at most ``limit_s`` seconds; ``measure``:
        a callable whose fields go into each beat (the bytes a download has reached, say)."""
        if self.store is None:
            yield
            return
        done = threading.Event()
        start = self.clock.monotonic()

        def run():
            while not done.wait(self.keepalive_every_s) and self.clock.monotonic() - start < limit_s:
                try:
                    extra = measure() if measure else {}
                except OSError:
                    extra = {}
                self.beat(force=True, busy=what, **extra)

        helper = threading.Thread(target=run, name="heartbeat-keepalive", daemon=True)
        helper.start()
        try:
            yield
        finally:
            done.set()
            helper.join()
            self.beat(force=True, busy=None, **({"download_bytes": None} if measure else {}))


class ProgressLine:
    """A line every few seconds: step/total, loss, lr, steps/s, ETA (to the trainer's log)."""

    def __init__(self, total: int, start_step: int, every_s: float = 2.0, quiet: bool = False):
        self.total, self.start_step, self.every_s, self.quiet = total, start_step, every_s, quiet
        self.t0 = self.last = time.time()
        self.rate = 0.0  # steps/s of this process since it started training

    def update(self, step: int, epoch: int, loss: float, lr: float, force: bool = False) -> None:
        now = time.time()
        self.rate = (step - self.start_step) / max(now - self.t0, 1e-9)  # the heartbeat carries it too
        if self.quiet or (not force and now - self.last < self.every_s):
            return
        self.last = now
        rate = self.rate
        eta = (self.total - step) / rate if rate > 0 else None
        log.info("step %d/%d epoch %d loss %.4f lr %.3e %.2f steps/s ETA %s", step, self.total, epoch, loss, lr,
                 rate, duration(eta))
