"""Which checkpoints are a job's: its identity from the spec and the data's content.

Invariants:
- A job's hashes are this version's (the training fields with the data file's sha256, never its
  path) and the one earlier versions wrote (over the path): checkpoints of either are the job's.
- Where the data cannot be read (``status`` on a laptop for a job whose CSV lies on a VM's
  disk), the hash the job recorded in ``state.json`` stands in for the content hash.
- Nothing here reads or writes torch; the data digest is storage's (storage.data_digest).
"""

from __future__ import annotations

from dataclasses import dataclass

from timellm_job.jobs import JobSpec, job_hashes, spec_hash
from timellm_job.jobs.spec import data_storage_options
from timellm_job.storage import Store
from timellm_job.storage.data_digest import DataUnreadable, data_sha256
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import STATE


@dataclass(frozen=True)
class Identity:
    data_sha256: str | None  # None: the data cannot be read here
    hash: str  # what new checkpoints carry (by content; by path when the data cannot be read)
    hashes: frozenset[str]  # every hash of the job's checkpoints


def identify(spec: JobSpec, job: Store | None = None, remember: bool = False) -> Identity:
    """The job's identity; ``remember``: memoize the data's digest on this machine (callers
    that have checked the spec and read the data anyway)."""
    try:
        digest = data_sha256(spec.data.path, data_storage_options(spec), remember=remember)
    except DataUnreadable:
        digest = None
    hashes = set(job_hashes(spec, digest))
    if digest is None and job is not None:
        try:
            recorded = (read_json(job, STATE) or {}).get("spec_hash")
        except ValueError:  # an unreadable state.json records nothing
            recorded = None
        if isinstance(recorded, str):
            hashes.add(recorded)
    return Identity(digest, spec_hash(spec, digest), frozenset(hashes))
