"""How a checkpoint becomes real: data files first, manifest last.

Invariants (tests/test_commit.py is named after them):
- A manifest exists only over complete files: it is written after every data file, and lists
  each one's size and sha256 as hashed while it was written.
- Nothing committed is rewritten: committing an id that already has a manifest raises
  :class:`AlreadyCommitted` and touches nothing.
- Each kind of store commits by its own strategy (storage.commit_strategy): a temporary folder
  renamed into place (POSIX), or a create-only manifest over the final prefix (object stores).
- Fencing: with a ``fence`` (the writer's lease generation), the fence is checked before the
  first file is written and right before the commit point; a fenced writer raises LeaseLost
  and commits nothing. The manifest records the generation (``lease_generation``).
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

from storage.commit_strategy import TMP_PREFIX, strategy_for
from storage.layout import CHECKPOINTS, checkpoint_id
from storage.lease import Fence
from storage.manifest import FORMAT_VERSION, MANIFEST, FileEntry, Kind, Manifest
from storage.store import Buffers, Store

__all__ = ["TMP_PREFIX", "AlreadyCommitted", "commit_checkpoint"]


class AlreadyCommitted(FileExistsError):
    """The checkpoint id is committed already; committed checkpoints are never rewritten."""


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
    work = strategy.begin(job, base, ckpt_id)

    def write(name: str) -> FileEntry:
        written = job.write_file(f"{work}/{name}", files[name], fsync=durable)
        return FileEntry(size=written.size, sha256=written.sha256)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:  # files in parallel
        entries = dict(zip(files, pool.map(write, files), strict=True))
    manifest = Manifest(format_version=FORMAT_VERSION, id=ckpt_id, step=step, kind=kind,
                        created_at=time.time(), spec_hash=spec_hash, progress=list(progress or [step]),
                        files=entries, metadata=dict(metadata or {}),
                        lease_generation=fence.generation if fence is not None else None)
    if fence is not None:
        fence.check()  # right before the commit point
    try:
        strategy.commit(job, work, final, MANIFEST, manifest.to_bytes(), durable)
    except FileExistsError:
        raise AlreadyCommitted(job.url_of(final)) from None
    return manifest
