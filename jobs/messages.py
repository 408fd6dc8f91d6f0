"""How an error reads in a job's record and on the terminal: one line, bounded.

Invariants: ``first_line`` never returns an empty string and never more than ``limit`` characters;
``duration`` is the one way a length of time is written for people (status, progress, ETA).
"""

from __future__ import annotations


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
