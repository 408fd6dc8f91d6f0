"""How an error reads in a job's record and on the terminal: one line, bounded.

Invariants: ``first_line`` never returns an empty string and never more than ``limit`` characters;
``duration`` is the one way a length of time is written for people (status, progress, ETA);
``log_to_stderr`` is the one place the product's log records become terminal lines.
"""

from __future__ import annotations

import logging
import sys


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (libraries put whole responses and tracebacks in
    theirs), or its type's name when it has none."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]


def duration(seconds: float | None) -> str:
    """``[Nd ]HH:MM:SS`` (no wrap at 24 hours); ``?`` for an unknown (None, NaN, negative) time."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time of each record (a test's
    capture, a redirected stream), flushed at each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it: the property decides
        pass


def log_to_stderr(fmt: str = "%(message)s", datefmt: str | None = None) -> None:
    """Send the product's log records (the ``timellm_job`` loggers, INFO and above) to standard
    error as the lines a person reads (one handler per process; called again, the new format). Other libraries' loggers are left as
    they are, so the terminal shows what it showed before the product logged."""
    logger = logging.getLogger("timellm_job")
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt, datefmt))  # a process has one terminal: the last format
    logger.setLevel(logging.INFO)
    logger.propagate = False
