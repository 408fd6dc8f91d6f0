"""The trainer's log in the job folder, uploaded in segments: ``logs/attempt-NNN-SSSS.log``.

Invariants: a segment holds at most ``SEGMENT_BYTES`` bytes of the attempt's log, in order; an
upload writes only what changed since the last one (the open segment, and any segment that
filled up since), so a long run costs O(new bytes) per upload, never the whole file again; a
full segment is never rewritten. Readers get an attempt's log by concatenating its segments
(after ``attempt-NNN.log``, the single file earlier versions wrote).
"""

from __future__ import annotations

import re
from pathlib import Path

from storage.layout import LOGS
from storage.store import Store

SEGMENT_BYTES = 1 << 20
NAME = re.compile(r"^attempt-(\d{3,})(?:-(\d{4,}))?\.log$")


class LogUploader:
    """Copies one attempt's growing local log file to the job folder, segment by segment."""

    def __init__(self, job: Store, attempt: int, segment_bytes: int = SEGMENT_BYTES):
        self.job, self.attempt, self.segment_bytes = job, attempt, segment_bytes
        self.segment = 0  # the open segment
        self.sent = 0  # bytes of the open segment uploaded so far

    def upload(self, path: Path) -> None:
        with open(path, "rb") as f:
            while True:
                start = self.segment * self.segment_bytes
                f.seek(start)
                data = f.read(self.segment_bytes)
                if len(data) > self.sent:
                    self.job.replace(f"{LOGS}/attempt-{self.attempt:03d}-{self.segment:04d}.log", data,
                                     durable=False)
                    self.sent = len(data)
                if len(data) < self.segment_bytes:
                    return
                self.segment, self.sent = self.segment + 1, 0  # full: never written again


def log_attempts(job: Store) -> list[int]:
    """The attempts that have a log in the job folder, in order."""
    found = {int(m.group(1)) for n, kind, _ in job.list_dir(LOGS) if kind == "file" and (m := NAME.match(n))}
    return sorted(found)


def read_log(job: Store, attempt: int) -> bytes:
    parts = []
    for name, kind, _ in job.list_dir(LOGS):
        m = NAME.match(name)
        if kind == "file" and m and int(m.group(1)) == attempt:
            parts.append((-1 if m.group(2) is None else int(m.group(2)), name))
    return b"".join(job.read_bytes(f"{LOGS}/{name}") for _, name in sorted(parts))
