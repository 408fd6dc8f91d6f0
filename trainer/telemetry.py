"""What the trainer reports besides its heartbeat's progress: metrics records (to the metrics
log and, with the extra, TensorBoard) and the time spent evaluating (the goodput clock).

Part of the trainer (trainer.loop's ``Trainer`` mixes it in; it uses the trainer's metrics, tb,
heartbeat and ``spent``).

Invariant: ``spent["eval_s"]`` grows by the wall time of every validation and test, also
while one runs (each batch's beat carries the running total).
"""

from __future__ import annotations

import contextlib
import time


class Telemetry:
    def _report(self, **record) -> None:
        """A metrics record: to the metrics log and, with the extra, to TensorBoard."""
        record.setdefault("time", time.time())
        self.metrics.add(**record)
        self.tb.add(record)

    def _flush_reports(self) -> None:
        self.metrics.flush()
        self.tb.flush()


    @contextlib.contextmanager
    def _evaluating(self):
        """Time spent validating or testing, added to ``spent["eval_s"]`` (and the heartbeat)."""
        self._eval_since = time.time()
        try:
            yield
        finally:
            self.spent["eval_s"] += time.time() - self._eval_since
            self._eval_since = None
            self.heartbeat.beat(force=True, eval_s=round(self.spent["eval_s"], 3))

    def _eval_beat(self, batch: int, batches: int) -> None:
        running = time.time() - self._eval_since if getattr(self, "_eval_since", None) else 0.0
        self.heartbeat.beat(eval_batch=batch, eval_batches=batches, eval_s=round(self.spent["eval_s"] + running, 3))
