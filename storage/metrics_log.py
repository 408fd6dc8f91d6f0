"""The per-step metrics log of a job: JSON lines under ``<job>/metrics/``.

Invariants: files are ``attempt-<NNN>-<SSSS>.jsonl`` segments (storage.segments) of at most
``SEGMENT_LINES`` lines; only the newest segment of the running attempt is ever rewritten
(atomically), so a long run on an object store does not re-upload its history. Readers get every
record in order.
"""

from __future__ import annotations

import json
import time
from typing import Any

from timellm_job.storage.layout import METRICS
from timellm_job.storage.segments import Segments, attempts_with, segment_names
from timellm_job.storage.store import Store

SEGMENT_LINES = 2000


class MetricsLog:
    def __init__(self, job: Store, attempt: int, enabled: bool = True):
        """``enabled=False``: records are dropped (a process that is not the job's writer)."""
        self.attempt, self.enabled = attempt, enabled
        self.segments = Segments(job, METRICS, attempt, ".jsonl")
        self.lines: list[str] = []
        self.dirty = False

    def add(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        record["attempt"] = self.attempt
        self.lines.append(json.dumps(record, sort_keys=True))
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:  # (a disabled log never is)
            return
        self.segments.put(("\n".join(self.lines) + "\n").encode())
        self.dirty = False
        if len(self.lines) >= SEGMENT_LINES:
            self.segments.seal()
            self.lines = []


def metrics_attempts(job: Store) -> list[int]:
    """The attempts that wrote metrics, in order."""
    return attempts_with(job, METRICS, ".jsonl")


def read_metrics(job: Store) -> list[dict]:
    """Every metrics record of the job, in attempt and segment order."""
    records = []
    for name in segment_names(job, METRICS, ".jsonl"):
        for line in job.read_bytes(f"{METRICS}/{name}").decode().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records
