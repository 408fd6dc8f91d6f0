"""What the trainer tells the world while it runs: heartbeat, metrics log, progress line.

Invariants:
- The heartbeat is a small local JSON document (path from ``TIMELLM_JOB_HEARTBEAT``) replaced
  atomically at most every ``interval`` seconds and at every event; the orchestrator reads it.
- The metrics log is JSON lines under ``<job>/metrics/``, in segments of at most
  ``SEGMENT_LINES`` lines: only the newest segment is ever rewritten, so a long run on an
  object store does not re-upload its whole history.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from storage import Store
from storage.documents import write_json
from storage.layout import METRICS
from storage.store import open_store

SEGMENT_LINES = 2000


class Heartbeat:
    def __init__(self, path: str | None, interval: float = 0.5):
        self.interval, self.last = interval, 0.0
        self.store = open_store(os.path.dirname(path)) if path else None
        self.name = os.path.basename(path) if path else None
        self.doc: dict[str, Any] = {"pid": os.getpid()}

    def beat(self, force: bool = False, **fields: Any) -> None:
        self.doc.update(fields)
        now = time.time()
        if self.store is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        self.doc["time"] = now
        write_json(self.store, self.name, self.doc)


class MetricsLog:
    def __init__(self, job: Store, attempt: int):
        self.job, self.attempt = job, attempt
        self.lines: list[str] = []
        self.segment = 0
        self.dirty = False

    def add(self, **record: Any) -> None:
        record.setdefault("time", time.time())
        record["attempt"] = self.attempt
        self.lines.append(json.dumps(record, sort_keys=True))
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        rel = f"{METRICS}/attempt-{self.attempt:03d}-{self.segment:04d}.jsonl"
        self.job.replace(rel, ("\n".join(self.lines) + "\n").encode())
        self.dirty = False
        if len(self.lines) >= SEGMENT_LINES:
            self.segment, self.lines = self.segment + 1, []


def read_metrics(job: Store) -> list[dict]:
    """Every metrics record of the job, in attempt and segment order."""
    records = []
    for name, kind, _ in job.list_dir(METRICS):
        if kind == "file" and name.endswith(".jsonl"):
            for line in job.read_bytes(f"{METRICS}/{name}").decode().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    return records


class ProgressLine:
    """A line every few seconds: step/total, loss, lr, steps/s, ETA (to the trainer's log)."""

    def __init__(self, total: int, start_step: int, every_s: float = 2.0):
        self.total, self.start_step, self.every_s = total, start_step, every_s
        self.t0 = self.last = time.time()

    def update(self, step: int, epoch: int, loss: float, lr: float, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.3e} "
              f"{rate:.2f} steps/s ETA {eta_s}", file=sys.stderr, flush=True)
