"""Was a trainer that died by SIGKILL killed by the kernel's out-of-memory killer (host RAM)?

A SIGKILL alone does not say who sent it. The kernel leaves two traces, read here where they
can be read (neither needs privileges on a usual container or VM; either may be missing):
- the ``oom_kill`` counter of the trainer's memory cgroup (cgroup v2 ``memory.events``, v1
  ``memory.oom_control``), read when the trainer starts and again when it died;
- the kernel log (``dmesg``), which names the pid it killed.

Invariant: evidence is reported only when a trace was seen; no trace means "unknown", never
"not an OOM kill".
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def counter_file(pid: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The file holding ``oom_kill`` for the memory cgroup of ``pid``."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidate = root / rel / "memory.events"
        elif "memory" in controllers.split(","):
            candidate = root / "memory" / rel / "memory.oom_control"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def oom_kills(counter: Path | None) -> int | None:
    if counter is None:
        return None
    try:
        found = re.search(r"^oom_kill (\d+)$", counter.read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def kernel_log_mentions(pid: int) -> str | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(out.splitlines()):
        if re.search(rf"(Killed process|oom-kill:.*pid=){pid}\b", line):
            return line.strip()[-200:]
    return None


class OomWatch:
    """Started with the trainer; asked after it died by SIGKILL."""

    def __init__(self, pid: int):
        self.pid = pid
        self.counter = counter_file(pid)
        self.before = oom_kills(self.counter)

    def evidence(self) -> str | None:
        seen = []
        after = oom_kills(self.counter)
        if self.before is not None and after is not None and after > self.before:
            seen.append(f"its memory cgroup counted {after - self.before} OOM kill(s) ({self.counter})")
        line = kernel_log_mentions(self.pid)
        if line:
            seen.append(f"kernel log: {line}")
        return "; ".join(seen) or None
