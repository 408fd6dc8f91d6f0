"""How each kind of store makes a checkpoint folder appear whole: one small protocol, one
implementation per kind (in the manner of Orbax's ``TemporaryPath``). A new backend gets its
strategy here and nowhere else.

Invariants:
- ``begin`` names the folder the files are written into; ``commit`` makes the checkpoint real
  in one atomic step, or raises FileExistsError when the checkpoint is committed already (it
  never replaces a committed one).
- ``create_only`` is True only where the store can write an object *only if absent* atomically
  (local disks and mounts: O_EXCL/link; GCS: ifGenerationMatch=0; S3: If-None-Match). The
  lease's generations rely on it; a store without it is refused unless the job opts in to the
  unsafe single-writer mode (``storage.unsafe_single_writer``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # storage.store builds on storage.backends, which names these strategies
    from storage.store import Store

TMP_PREFIX = ".tmp-"


class CommitStrategy(Protocol):
    name: str
    create_only: bool

    def begin(self, job: Store, base: str, ckpt_id: str) -> str: ...

    def commit(self, job: Store, work: str, final: str, manifest_name: str, manifest: bytes, durable: bool) -> None: ...


class RenameFolder:
    """POSIX (a disk, Colab's Drive mount): files in a temporary sibling folder, fsynced, then
    the folder renamed into place; the final folder appears whole or not at all."""

    name, create_only = "rename-folder", True

    def begin(self, job: Store, base: str, ckpt_id: str) -> str:
        work = f"{base}/{TMP_PREFIX}{ckpt_id}-{uuid.uuid4().hex[:8]}"
        job.makedirs(work)
        return work

    def commit(self, job: Store, work: str, final: str, manifest_name: str, manifest: bytes, durable: bool) -> None:
        job.write_file(f"{work}/{manifest_name}", manifest, fsync=durable)
        if job.exists(f"{final}/{manifest_name}"):
            job.remove(work, recursive=True)
            raise FileExistsError(job.url_of(final))
        job.remove(final, recursive=True)  # an uncommitted leftover (e.g. a half-done deletion)
        job.rename_dir(work, final)  # the commit point


class CreateOnlyManifest:
    """Object stores (no atomic folder rename): files under the final prefix, then the manifest
    written create-only is the commit point. Leftovers of an earlier uncommitted try are removed
    first, so a committed folder holds exactly its manifest's files."""

    name = "create-only-manifest"

    def __init__(self, create_only: bool = True):
        self.create_only = create_only

    def begin(self, job: Store, base: str, ckpt_id: str) -> str:
        final = f"{base}/{ckpt_id}"
        job.remove(final, recursive=True)  # leftovers of an uncommitted try
        return final

    def commit(self, job: Store, work: str, final: str, manifest_name: str, manifest: bytes, durable: bool) -> None:
        job.create(f"{final}/{manifest_name}", manifest)  # the commit point; FileExistsError if taken


def strategy_for(job: Store) -> CommitStrategy:
    """The commit strategy of ``job``'s kind of store (its backend's, storage.backends)."""
    return job.backend.commit_strategy()
