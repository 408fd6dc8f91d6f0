"""Checkpoints that do not verify, set apart: moved out of ``checkpoints/`` whole, never deleted.

A checkpoint whose files no longer match its manifest (bitrot, a sync that zero-filled a file)
is useless where it is and blocks its id: the job could never commit that id again. Setting it
apart frees the id and keeps the bytes for whoever wants to look.

Invariants:
- ``set_apart`` moves the checkpoint to ``set-apart/<id>-<UTC time>-<random>/`` with a note
  (``<name>.json``: why, when, by which lease generation) beside it. On POSIX that is one rename;
  on object stores every object is copied first and the original is then deleted the way
  retention deletes (manifest first), so at every moment one of the two copies is whole.
- Only the lease holder sets apart: the fence is checked before anything moves.
- Nothing under ``set-apart/`` is ever loaded, counted by retention or deleted by timellm-job.
"""

from __future__ import annotations

import json
import time
import uuid

from timellm_job.storage.layout import CHECKPOINTS, SET_APART
from timellm_job.storage.lease import Fence
from timellm_job.storage.manifest import Manifest
from timellm_job.storage.retention import delete_checkpoint
from timellm_job.storage.store import Store


def set_apart(job: Store, manifest: Manifest, why: str, fence: Fence | None = None,
              base: str = CHECKPOINTS) -> str:
    """Move ``manifest``'s checkpoint under ``set-apart/``; returns where it went (relative)."""
    if fence is not None:
        fence.check()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{manifest.id}-{stamp}-{uuid.uuid4().hex[:6]}"
    dest, source = f"{SET_APART}/{name}", manifest.folder(base)
    note = {"id": manifest.id, "why": why, "at": time.time(), "from": source,
            "lease_generation": fence.generation if fence is not None else None}
    job.replace(f"{SET_APART}/{name}.json", json.dumps(note, indent=1, sort_keys=True).encode())
    if job.backend.renames_folders:
        job.makedirs(SET_APART)
        job.rename_dir(source, dest)
        return dest
    _copy_tree(job, source, dest)
    delete_checkpoint(job, manifest.id, base)
    return dest


def _copy_tree(job: Store, source: str, dest: str) -> None:
    for name, kind, _ in job.list_dir(source):
        if kind == "directory":
            _copy_tree(job, f"{source}/{name}", f"{dest}/{name}")
        else:
            job.copy_file(f"{source}/{name}", f"{dest}/{name}")


def list_set_apart(job: Store) -> list[dict]:
    """The notes of everything set apart, oldest first."""
    notes = []
    for name, kind, _ in job.list_dir(SET_APART):
        if kind == "file" and name.endswith(".json"):
            try:
                doc = json.loads(job.read_bytes(f"{SET_APART}/{name}"))
            except (ValueError, FileNotFoundError):
                continue
            if isinstance(doc, dict):
                notes.append({**doc, "folder": f"{SET_APART}/{name[:-5]}"})
    return sorted(notes, key=lambda d: d.get("at") or 0)
