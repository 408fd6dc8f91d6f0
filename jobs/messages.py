"""How an error reads in a job's record and on the terminal: one line, bounded.

Invariant: ``first_line`` never returns an empty string and never more than ``limit`` characters.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (libraries put whole responses and tracebacks in
    theirs), or its type's name when it has none."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]
