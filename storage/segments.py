"""An attempt's append-only stream in the job folder, stored as numbered segments:
``<folder>/attempt-NNN-SSSS<suffix>`` (the trainer's log, the metrics log).

Invariants: only the open segment is ever rewritten (atomically, ``Store.replace``); a sealed
segment is never written again, so a long run on an object store costs O(new bytes) per upload,
never its history again. Readers get an attempt's stream by concatenating its segments in
order, after ``attempt-NNN<suffix>`` (the single file earlier versions wrote), if any.
"""

from __future__ import annotations

import re

from timellm_job.storage.store import Store


class Segments:
    """The segments of one attempt's stream, written through ``put`` (the open one) and ``seal``."""

    def __init__(self, job: Store, folder: str, attempt: int, suffix: str, durable: bool = True):
        self.job, self.folder, self.attempt, self.suffix, self.durable = job, folder, attempt, suffix, durable
        self.open = 0  # the open segment's number

    def put(self, data: bytes) -> None:
        """The open segment's whole content, replacing what it held."""
        self.job.replace(f"{self.folder}/attempt-{self.attempt:03d}-{self.open:04d}{self.suffix}", data,
                         durable=self.durable)

    def seal(self) -> None:
        """The open segment is full: it is never written again; the next one opens."""
        self.open += 1


def _pattern(suffix: str) -> re.Pattern[str]:
    return re.compile(r"^attempt-(\d{3,})(?:-(\d{4,}))?" + re.escape(suffix) + "$")


def segment_names(job: Store, folder: str, suffix: str, attempt: int | None = None) -> list[str]:
    """The segment files (of ``attempt``, or of all), in attempt then segment order."""
    pattern, found = _pattern(suffix), []
    for name, kind, _ in job.list_dir(folder):
        m = pattern.match(name)
        if kind == "file" and m and (attempt is None or int(m.group(1)) == attempt):
            found.append((int(m.group(1)), -1 if m.group(2) is None else int(m.group(2)), name))
    return [name for *_, name in sorted(found)]


def attempts_with(job: Store, folder: str, suffix: str) -> list[int]:
    """The attempts that left a stream in ``folder``, in order."""
    pattern = _pattern(suffix)
    return sorted({int(m.group(1)) for name in segment_names(job, folder, suffix) if (m := pattern.match(name))})
