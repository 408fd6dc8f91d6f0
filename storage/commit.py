"""How a checkpoint becomes real: data files first, manifest last.

Invariants (tests/test_commit.py is named after them):
- A manifest exists only over complete files: it is written after every data file, and lists
  each one's size and sha256 as hashed while it was written.
- Nothing committed is rewritten: committing an id that already has a manifest raises
  :class:`AlreadyCommitted` and touches nothing.
- Local filesystems (disks, Colab's Drive mount): files go into a temporary sibling folder
  ``checkpoints/.tmp-<id>-<nonce>``, are fsynced, and the folder is renamed into place; the final
  folder therefore appears whole or not at all.
- Object stores (no atomic folder rename): files go under the final prefix, and the manifest,
  written create-only, is the commit point. Leftovers of an earlier uncommitted try are removed
  first, so a committed folder holds exactly its manifest's files.
- A crash at any point leaves earlier commits untouched; what it leaves behind has no manifest
  and is never loaded (storage.checkpoints), and is cleaned up later (storage.retention).
- ``durable=False`` skips the files' fsyncs (the folder still appears whole or not at all to
  running processes, but a power cut may tear it): only for copies that are verified before every use
  and can be fetched again (a machine's copy of the backbone cache), never for checkpoints.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.layout import CHECKPOINTS, checkpoint_id
from storage.manifest import FORMAT_VERSION, MANIFEST, FileEntry, Kind, Manifest
from storage.store import Buffers, Store

TMP_PREFIX = ".tmp-"


class AlreadyCommitted(FileExistsError):
    """The checkpoint id is committed already; committed checkpoints are never rewritten."""


def commit_checkpoint(job: Store, step: int, kind: Kind, files: dict[str, Buffers], spec_hash: str,
                      progress: list[int] | None = None, metadata: dict[str, Any] | None = None,
                      ckpt_id: str | None = None, base: str = CHECKPOINTS, durable: bool = True,
                      workers: int = 4) -> Manifest:
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
    if job.is_local:
        work = f"{base}/{TMP_PREFIX}{ckpt_id}-{uuid.uuid4().hex[:8]}"
        job.makedirs(work)
    else:
        work = final
        job.remove(final, recursive=True)  # leftovers of an uncommitted try
    def write(name: str) -> FileEntry:
        written = job.write_file(f"{work}/{name}", files[name], fsync=durable)
        return FileEntry(size=written.size, sha256=written.sha256)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:  # files in parallel
        entries = dict(zip(files, pool.map(write, files), strict=True))
    manifest = Manifest(format_version=FORMAT_VERSION, id=ckpt_id, step=step, kind=kind,
                        created_at=time.time(), spec_hash=spec_hash, progress=list(progress or [step]),
                        files=entries, metadata=dict(metadata or {}))
    if job.is_local:
        job.write_file(f"{work}/{MANIFEST}", manifest.to_bytes(), fsync=durable)
        job.remove(final, recursive=True)  # an uncommitted leftover (e.g. a half-done deletion)
        job.rename_dir(work, final)  # the commit point
    else:
        try:
            job.create(f"{final}/{MANIFEST}", manifest.to_bytes())  # the commit point
        except FileExistsError:
            raise AlreadyCommitted(job.url_of(final)) from None
    return manifest
