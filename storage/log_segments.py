"""The trainer's log in the job folder, uploaded in segments: ``logs/attempt-NNN-SSSS.log``.

Invariants: a segment (storage.segments) holds at most ``SEGMENT_BYTES`` bytes of the attempt's
log, in order; an upload writes only what changed since the last one (the open segment, and any
segment that filled up since), so a long run costs O(new bytes) per upload, never the whole file
again; a full segment is never rewritten. Readers get an attempt's log by concatenating its segments
(after ``attempt-NNN.log``, the single file earlier versions wrote).
"""

from __future__ import annotations

from pathlib import Path

from timellm_job.storage.layout import LOGS
from timellm_job.storage.segments import Segments, attempts_with, segment_names
from timellm_job.storage.store import Store

SEGMENT_BYTES = 1 << 20


class LogUploader:
    """Copies one attempt's growing local log file to the job folder, segment by segment."""

    def __init__(self, job: Store, attempt: int, segment_bytes: int = SEGMENT_BYTES):
        self.attempt, self.segment_bytes = attempt, segment_bytes
        self.segments = Segments(job, LOGS, attempt, ".log", durable=False)
        self.sent = 0  # bytes of the open segment uploaded so far

    def upload(self, path: Path) -> None:
        with open(path, "rb") as f:
            while True:
                f.seek(self.segments.open * self.segment_bytes)
                data = f.read(self.segment_bytes)
                if len(data) > self.sent:
                    self.segments.put(data)
                    self.sent = len(data)
                if len(data) < self.segment_bytes:
                    return
                self.segments.seal()  # full: never written again
                self.sent = 0


def log_attempts(job: Store) -> list[int]:
    """The attempts that have a log in the job folder, in order."""
    return attempts_with(job, LOGS, ".log")


def read_log(job: Store, attempt: int) -> bytes:
    return b"".join(job.read_bytes(f"{LOGS}/{name}") for name in segment_names(job, LOGS, ".log", attempt))
