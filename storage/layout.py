"""Where a job's objects live under ``<root>/<name>/``.

Invariants:
- A job name cannot escape the root: it is one path component of safe characters.
- These names are the whole layout; nothing else of ours writes elsewhere under the job.
"""

from __future__ import annotations

from typing import Any

from timellm_job.jobs.spec import NAME_RULE, safe_name
from timellm_job.storage.retry import StorageError
from timellm_job.storage.store import Store

SPEC = "job.yaml"
STATE = "state.json"
LEASE = "lease.json"  # written by versions before lease generations; read while it lives
LEASES = "lease"  # lease/<generation>.json: the lease, one document per generation
CHECKPOINTS = "checkpoints"
LOGS = "logs"
METRICS = "metrics"
RESULTS = "results.json"
BACKBONE = "backbone"
STOP = "stop.json"  # a stop request for the running submit (timellm-job stop)
TENSORBOARD = "tb"  # TensorBoard event files (trainer.tensorboard), with the tensorboard extra
SET_APART = "set-apart"  # checkpoints (and documents) that did not verify, moved aside, never deleted

def job_store(root: str, name: str, options: dict[str, Any] | None = None) -> Store:
    """The Store of one job: ``<root>/<name>``. Refuses names that would escape the root."""
    if not safe_name(name):  # the spec's rule, whole (no trailing newline)
        raise StorageError(f"job name {name!r} is not a safe folder name: it {NAME_RULE}")
    return Store(root, options).child(name)


def checkpoint_dir(ckpt_id: str) -> str:
    return f"{CHECKPOINTS}/{ckpt_id}"


def checkpoint_id(step: int, kind: str) -> str:
    return f"{step:09d}-{kind}"
