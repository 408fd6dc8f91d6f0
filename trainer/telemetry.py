"""The trainer's one reporter: the typed heartbeat (to the orchestrator), metrics records (to the
metrics log and, with the extra, TensorBoard), the start-up marks and the goodput clocks.

Invariants:
- Only rank 0 writes (the other ranks' reporter writes nothing, and costs nothing).
- ``spent["eval_s"]`` grows by the wall time of every validation and test, also while one runs
  (each batch's beat carries the running total); ``spent["training_s"]`` by every step's time.
- Start-up marks (imported, backbone, built, resumed, first_step) go to the heartbeat once the
  first step is taken, so the orchestrator can tell where a restart's time went.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from timellm_job.jobs.protocol import ENV_HEARTBEAT
from timellm_job.storage import Store
from timellm_job.trainer.reporting import HeartbeatWriter, MetricsLog
from timellm_job.trainer.tensorboard import TensorBoardLog


class Reporter:
    def __init__(self, job: Store, attempt: int, main: bool):
        self.heartbeat = HeartbeatWriter(os.environ.get(ENV_HEARTBEAT) if main else None)
        self.metrics = MetricsLog(job, attempt, enabled=main)
        self.tb = TensorBoardLog(job, attempt, enabled=main)  # with the tensorboard extra
        self.startup = {"imported": time.time()}
        self.spent = {"training_s": 0.0, "eval_s": 0.0}  # where this attempt's time went (goodput)
        self._eval_since: float | None = None
        self._step_mark: float | None = None

    def beat(self, force: bool = False, **fields: Any) -> None:
        self.heartbeat.beat(force=force, **fields)

    def mark(self, name: str) -> None:
        """A start-up mark (``built``, ``resumed``...)."""
        self.startup[name] = time.time()

    def record(self, **record: Any) -> None:
        """A metrics record: to the metrics log and, with the extra, to TensorBoard."""
        record.setdefault("time", time.time())
        self.metrics.add(**record)
        self.tb.add(record)

    def flush(self) -> None:
        self.metrics.flush()
        self.tb.flush()

    def training_started(self) -> None:
        """The training clock runs from here (each epoch's first step counts from its start)."""
        self._step_mark = time.time()

    def stepped(self, **fields: Any) -> None:
        """One optimizer step taken: the training clock and a (rate-limited) beat; the start-up
        marks with the first step of the attempt."""
        now = time.time()
        self.spent["training_s"] += now - (self._step_mark or now)
        self._step_mark = now
        self.beat(training_s=round(self.spent["training_s"], 3), **fields)
        if "first_step" not in self.startup:
            self.startup["first_step"] = time.time()
            self.beat(force=True, startup=self.startup)

    @contextlib.contextmanager
    def evaluating(self):
        """Time spent validating or testing, added to ``spent["eval_s"]`` (and the heartbeat)."""
        self._eval_since = time.time()
        try:
            yield
        finally:
            self.spent["eval_s"] += time.time() - self._eval_since
            self._eval_since = None
            self.beat(force=True, eval_s=round(self.spent["eval_s"], 3))

    def eval_beat(self, batch: int, batches: int) -> None:
        running = time.time() - self._eval_since if self._eval_since else 0.0
        self.beat(eval_batch=batch, eval_batches=batches, eval_s=round(self.spent["eval_s"] + running, 3))
