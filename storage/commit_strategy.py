"""How each kind of store makes a checkpoint appear whole, and how it goes away again: one small
protocol, one implementation per kind, and the choice between them (:func:`strategy_for`, from
the backend's capabilities), in the manner of Orbax's atomicity modules. A new kind of store
gets its strategy here and nowhere else.

Invariants:
- Every writer writes into a place of its own, named by its *writer token* (its lease
  generation and a random part, :func:`writer_token`): two writers of the same checkpoint id,
  however they interleave, never write into the same place.
- ``commit`` makes the checkpoint real in one atomic step, or raises FileExistsError when it is
  committed already. After that step nobody writes or removes a byte of it: not a late writer
  fenced out by a newer lease holder, not a second writer of the same id. Only ``delete`` (by
  retention, under the lease) removes a committed checkpoint.
- ``abort`` removes what one writer wrote and nothing else.
- POSIX (``RenameFolder``): files in a private sibling ``.tmp-<id>-<writer>``, then one
  rename onto the final name, which rename(2) refuses while a checkpoint is there; a deletion
  renames the folder aside first, so a final name never holds a half-deleted folder.
- Object stores (``WriterPrefix``): no rename, so files go under ``<id>/<writer>/`` and the
  manifest, written create-only at ``<id>/manifest.json``, names that prefix (``data_dir``).
  Late files of a fenced writer land under its own prefix, never among the committed ones.
- ``create_only`` is True only where the store can write an object *only if absent* atomically
  (local disks and mounts: O_EXCL/link; GCS: ifGenerationMatch=0; S3: If-None-Match). The
  lease's generations rely on it; a store without it is refused unless the job opts in to the
  unsafe single-writer mode (``storage.unsafe_single_writer``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Protocol

from timellm_job.storage.manifest import MANIFEST
from timellm_job.storage.store import Store

TMP_PREFIX = ".tmp-"
_WRITER = re.compile(r"^w(\d{10})-[0-9a-f]{8}$")
_TMP_WRITER = re.compile(r"-(w\d{10}-[0-9a-f]{8})$")


def writer_token(generation: int | None) -> str:
    """The name of one writer's private place: ``w<generation>-<random>``."""
    return f"w{generation or 0:010d}-{uuid.uuid4().hex[:8]}"


def writer_generation(name: str) -> int | None:
    """The lease generation in a writer's place (a prefix, or a POSIX temporary folder), or None
    when the name is not a writer's."""
    token = name if _WRITER.match(name) else (m.group(1) if (m := _TMP_WRITER.search(name)) else None)
    return int(token[1:11]) if token else None


@dataclass
class Work:
    folder: str  # where the files are written, relative to the job
    data_dir: str  # what the manifest records: the files' folder under the checkpoint's ("": itself)


class CommitStrategy(Protocol):
    name: str
    create_only: bool

    def begin(self, job: Store, base: str, ckpt_id: str, writer: str) -> Work: ...

    def commit(self, job: Store, work: Work, final: str, manifest: bytes, durable: bool) -> None: ...

    def abort(self, job: Store, work: Work) -> None: ...

    def delete(self, job: Store, final: str) -> None: ...


class RenameFolder:
    """POSIX (a disk, Colab's Drive mount): the whole folder appears in one rename."""

    name, create_only = "rename-folder", True

    def begin(self, job: Store, base: str, ckpt_id: str, writer: str) -> Work:
        work = Work(f"{base}/{TMP_PREFIX}{ckpt_id}-{writer}", "")
        job.makedirs(work.folder)
        return work

    def commit(self, job: Store, work: Work, final: str, manifest: bytes, durable: bool) -> None:
        job.write_file(f"{work.folder}/{MANIFEST}", manifest, fsync=durable)
        try:
            job.rename_dir(work.folder, final)  # the commit point; refused onto a non-empty folder
        except FileExistsError:
            if job.exists(f"{final}/{MANIFEST}"):
                raise
            # a folder without a manifest, left by an earlier version's deletion: moved aside
            # (never removed in place), put back if it turns out to be committed after all
            aside = _aside(final, "stale")
            job.rename_dir(final, aside)
            if job.exists(f"{aside}/{MANIFEST}"):
                job.rename_dir(aside, final)
                raise
            job.rename_dir(work.folder, final)

    def abort(self, job: Store, work: Work) -> None:
        job.remove(work.folder, recursive=True)

    def delete(self, job: Store, final: str) -> None:
        aside = _aside(final, "deleted")
        try:
            job.rename_dir(final, aside)  # one step: the final name is gone whole
        except FileNotFoundError:
            return
        job.remove(aside, recursive=True)


class WriterPrefix:
    """Object stores: files under the writer's own prefix, then the manifest, created only if
    absent, is the commit point."""

    name = "writer-prefix"

    def __init__(self, create_only: bool = True):
        self.create_only = create_only

    def begin(self, job: Store, base: str, ckpt_id: str, writer: str) -> Work:
        return Work(f"{base}/{ckpt_id}/{writer}", writer)

    def commit(self, job: Store, work: Work, final: str, manifest: bytes, durable: bool) -> None:
        job.create(f"{final}/{MANIFEST}", manifest)  # the commit point; FileExistsError if taken

    def abort(self, job: Store, work: Work) -> None:
        job.remove(work.folder, recursive=True)

    def delete(self, job: Store, final: str) -> None:
        job.remove(f"{final}/{MANIFEST}")  # uncommitted first: a half-done deletion is no checkpoint
        job.remove(final, recursive=True)


def _aside(final: str, why: str) -> str:
    base, _, name = final.rpartition("/")
    return f"{base}/{TMP_PREFIX}{why}-{name}-{uuid.uuid4().hex[:8]}" if base else \
        f"{TMP_PREFIX}{why}-{name}-{uuid.uuid4().hex[:8]}"


def strategy_for(job: Store) -> CommitStrategy:
    """The commit strategy for ``job``'s kind of store, from what its backend can do: an atomic
    folder rename where there is one, else a writer's prefix and a create-only manifest."""
    backend = job.backend
    return RenameFolder() if backend.renames_folders else WriterPrefix(create_only=backend.create_only)
