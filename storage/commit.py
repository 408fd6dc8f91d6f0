"""How a checkpoint becomes real: data files first, manifest last.

Invariants (tests/test_commit.py is named after them):
- A manifest exists only over complete files: it is written after every data file, lists each
  one's size and sha256 as hashed while it was written, and only once the store reports each
  file at that size (a short write is an error, never a checkpoint whose manifest lies).
- Nothing committed is rewritten: committing an id that already has a manifest raises
  :class:`AlreadyCommitted`, and no byte of the committed checkpoint is written or removed, by
  this writer or by a late one (storage.commit_strategy: every writer writes in a place of its own).
- Each kind of store commits by its own strategy (storage.commit_strategy): a private folder
  renamed into place (POSIX), or a create-only manifest naming the writer's prefix (object stores).
- Fencing: with a ``fence`` (the writer's lease generation), the fence is checked before the
  first file is written and right before the commit point; a fenced writer raises LeaseLost
  and commits nothing. The manifest records the generation (``lease_generation``).
- A commit that fails, for any reason, removes what it wrote (best effort: a store that fails
  the removal too leaves a leftover that retention removes later) and nothing else.
- A crash at any point leaves earlier commits untouched; what it leaves behind has no manifest
  and is never loaded (storage.checkpoints), and is cleaned up later (storage.retention).
- ``durable=False`` skips the files' fsyncs (the folder still appears whole or not at all to
  running processes, but a power cut may tear it): only for copies that are verified before every use
  and can be fetched again (a machine's copy of the backbone cache), never for checkpoints.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from timellm_job.storage.commit_strategy import TMP_PREFIX, CommitStrategy, Work, strategy_for, writer_token
from timellm_job.storage.layout import CHECKPOINTS, checkpoint_id
from timellm_job.storage.lease import Fence
from timellm_job.storage.manifest import MANIFEST, FileEntry, Kind, Manifest
from timellm_job.storage.retry import StorageError
from timellm_job.storage.store import Buffers, Store

__all__ = ["TMP_PREFIX", "AlreadyCommitted", "ShortWrite", "commit_checkpoint"]


class AlreadyCommitted(FileExistsError):
    """The checkpoint id is committed already; committed checkpoints are never rewritten."""


class ShortWrite(StorageError):
    """A file reached the store shorter (or longer) than the bytes written and hashed."""


def commit_checkpoint(job: Store, step: int, kind: Kind, files: dict[str, Buffers], spec_hash: str,
                      progress: list[int] | None = None, metadata: dict[str, Any] | None = None,
                      ckpt_id: str | None = None, base: str = CHECKPOINTS, durable: bool = True,
                      workers: int = 4, fence: Fence | None = None) -> Manifest:
    """Write ``files`` as ``<base>/<step>-<kind>`` (or ``<base>/<ckpt_id>``) and commit it.

    ``base`` is the folder of committed folders: ``checkpoints`` for training checkpoints; the
    backbone cache commits under ``backbone`` with the same protocol. ``workers``: files written
    (and hashed) at once. Returns the manifest.
    """
    ckpt_id = ckpt_id or checkpoint_id(step, kind)
    final = f"{base}/{ckpt_id}"
    if job.exists(f"{final}/{MANIFEST}"):
        raise AlreadyCommitted(job.url_of(final))
    if any(name == MANIFEST or "/" in name or name.startswith(".") for name in files):
        raise ValueError(f"invalid checkpoint file names: {sorted(files)}")
    strategy = strategy_for(job)
    if fence is not None:
        fence.check()
    work = strategy.begin(job, base, ckpt_id, writer_token(fence.generation if fence is not None else None))
    try:
        entries = _write_files(job, work, files, durable, workers)
        manifest = Manifest(format_version=2 if work.data_dir else 1, id=ckpt_id, step=step, kind=kind,
                            created_at=time.time(), spec_hash=spec_hash, progress=list(progress or [step]),
                            files=entries, metadata=dict(metadata or {}),
                            lease_generation=fence.generation if fence is not None else None,
                            data_dir=work.data_dir)
        if fence is not None:
            fence.check()  # right before the commit point
        data = manifest.to_bytes()
        try:
            strategy.commit(job, work, final, data, durable)
        except FileExistsError:
            if _committed_bytes(job, final) == data:  # a retried call whose first try took effect
                return manifest
            raise AlreadyCommitted(job.url_of(final)) from None
    except BaseException:
        _abort(strategy, job, work)
        raise
    return manifest


def _write_files(job: Store, work: Work, files: dict[str, Buffers], durable: bool,
                 workers: int) -> dict[str, FileEntry]:
    """Every file written (and hashed) under ``work``, several at once; then each one's size as
    the store reports it compared with the bytes hashed."""
    def write(name: str) -> FileEntry:
        written = job.write_file(f"{work.folder}/{name}", files[name], fsync=durable)
        return FileEntry(size=written.size, sha256=written.sha256)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:  # files in parallel
        entries = dict(zip(files, pool.map(write, files), strict=True))
    stored = {name: size for name, kind, size in job.list_dir(work.folder) if kind == "file"}
    for name, entry in entries.items():
        if stored.get(name) != entry.size:
            raise ShortWrite(f"{job.url_of(f'{work.folder}/{name}')}: {stored.get(name, 0)} bytes on the store, "
                             f"{entry.size} written (a short write: is the disk full?)")
    return entries


def _committed_bytes(job: Store, final: str) -> bytes | None:
    try:
        return job.read_bytes(f"{final}/{MANIFEST}")
    except (FileNotFoundError, StorageError):
        return None


def _abort(strategy: CommitStrategy, job: Store, work: Work) -> None:
    """Remove what this commit wrote; a failure to do so is left to retention (the commit's own
    error is the one the caller sees)."""
    try:
        strategy.abort(job, work)
    except Exception:  # noqa: BLE001 - best effort, see the docstring
        pass
