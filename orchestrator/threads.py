"""How many intra-op threads each trainer process gets when several share one machine.

torch sizes its intra-op pool by the machine's physical cores, per process: N processes on C
cores run N x C threads that spin against each other (two tiny jobs at once on 2 cores ran 30
times slower each; with one thread each, 0.7 times as fast as alone). torchrun's own default
is one thread per process, which leaves all but N cores idle on a bigger machine.

Invariants:
- Processes started together get ``usable_cores() // processes`` threads each, at least one:
  together no more threads than the cores this process may use (its CPU affinity and its
  cgroup's CPU quota, as a container or a Colab runtime sets them).
- A thread count the user set (``OMP_NUM_THREADS`` in the environment) is kept as it is.
- A single process is left to torch's own choice (nothing is set): a job's numbers on CPU do not
  change with this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``, v1 ``cfs_quota_us``), in cores;
    None when there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def threads_per_process(processes: int, cores: int) -> int:
    return max(1, cores // max(1, processes))


def thread_env(processes: int, environ: Mapping[str, str] = os.environ, cores: int | None = None) -> dict[str, str]:
    """The environment that divides the cores between ``processes`` trainer processes started
    together; empty for one process, or when the user set the thread count."""
    if processes <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    n = threads_per_process(processes, usable_cores() if cores is None else cores)
    return {name: str(n) for name in THREAD_VARS}
