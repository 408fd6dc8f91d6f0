"""The per-step metrics log of a job: JSON lines under ``<job>/metrics/``.

Invariants: files are ``attempt-<NNN>-<SSSS>.jsonl`` segments of at most ``SEGMENT_LINES``
lines; only the newest segment of the running attempt is ever rewritten (atomically), so a long
run on an object store does not re-upload its history. Readers get every record in order.
"""

from __future__ import annotations

import json
import time
from typing import Any

from storage.layout import METRICS
from storage.store import Store

SEGMENT_LINES = 2000


class MetricsLog:
    def __init__(self, job: Store, attempt: int, enabled: bool = True):
        """``enabled=False``: records are dropped (a process that is not the job's writer)."""
        self.job, self.attempt, self.enabled = job, attempt, enabled
        self.lines: list[str] = []
        self.segment = 0
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
        rel = f"{METRICS}/attempt-{self.attempt:03d}-{self.segment:04d}.jsonl"
        self.job.replace(rel, ("\n".join(self.lines) + "\n").encode())
        self.dirty = False
        if len(self.lines) >= SEGMENT_LINES:
            self.segment, self.lines = self.segment + 1, []


def metrics_attempts(job: Store) -> list[int]:
    """The attempts that wrote metrics, in order."""
    found = set()
    for name, kind, _ in job.list_dir(METRICS):
        if kind == "file" and name.startswith("attempt-") and name.endswith(".jsonl"):
            try:
                found.add(int(name.split("-")[1]))
            except (IndexError, ValueError):
                continue
    return sorted(found)


def read_metrics(job: Store) -> list[dict]:
    """Every metrics record of the job, in attempt and segment order."""
    records = []
    for name, kind, _ in job.list_dir(METRICS):
        if kind == "file" and name.endswith(".jsonl"):
            for line in job.read_bytes(f"{METRICS}/{name}").decode().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    return records
