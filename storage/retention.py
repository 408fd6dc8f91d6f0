"""Which checkpoints to keep, and the clean-up of everything else.

Invariants:
- Kept: the ``save_total_limit`` newest step checkpoints that pass the size check, the newest
  best, the newest preempt, and any imported checkpoint that is the newest of all; and, of each
  kind, the newest checkpoint known whole by its hashes (``verified``: those this process
  committed, hashing the bytes as it wrote them, or read back and verified), so that a
  checkpoint whose sizes are right but whose bytes are not (a torn or zero-filled write of the
  right length) can never make retention delete the last checkpoint known to be whole.
- Deletion happens only after a newer checkpoint of the same role has committed: the newest
  valid step checkpoint and the best are never deleted, so a crash during clean-up leaves them.
- The manifest is deleted first, so a half-deleted folder is uncommitted, never a torn checkpoint.
- A committed checkpoint that fails the size check but is newer than everything kept is left
  alone (on Drive it may be an upload still arriving).
- Checkpoints that are not the job's (another spec, a copied folder: see list_checkpoints) are
  neither counted nor removed.
- Uncommitted folders (no manifest, temporary siblings) are removed; the caller runs clean-up
  only while no write of its own is in flight (the single background saver runs it after its
  own commit), and the lease guarantees no other writer: a writer whose lease generation was
  taken over deletes nothing (its fence is checked first).
"""

from __future__ import annotations

from storage.checkpoints import Listing, check_sizes, list_checkpoints
from storage.layout import CHECKPOINTS
from storage.lease import Fence
from storage.manifest import MANIFEST, Manifest
from storage.store import Store


def plan(job: Store, listing: Listing, save_total_limit: int, verified: set[str] | None = None) -> list[str]:
    """Ids of committed checkpoints that retention removes (none of the protected ones)."""
    by_kind: dict[str, list[Manifest]] = {}
    for m in listing.committed:  # newest first
        by_kind.setdefault(m.kind, []).append(m)
    keep: set[str] = set()
    whole_steps = [m for m in by_kind.get("step", []) if not check_sizes(job, m)]
    keep.update(m.id for m in whole_steps[:save_total_limit])
    for kind in ("best", "preempt", "imported"):
        whole = [m for m in by_kind.get(kind, []) if not check_sizes(job, m)]
        if whole:
            keep.add(whole[0].id)
    for manifests in by_kind.values():  # the newest known whole by hash, of each kind
        known = [m for m in manifests if m.id in (verified or ())]
        if known:
            keep.add(known[0].id)
    if not keep:
        return []
    newest_kept = max((m for m in listing.committed if m.id in keep), key=Manifest.order)
    drop = []
    for m in listing.committed:
        if m.id in keep:
            continue
        # a torn checkpoint newer than everything kept may be a lagging upload: leave it
        if m.order() > newest_kept.order():
            continue
        drop.append(m.id)
    return drop


def delete_checkpoint(job: Store, ckpt_id: str, base: str = CHECKPOINTS) -> None:
    job.remove(f"{base}/{ckpt_id}/{MANIFEST}")  # uncommit first
    job.remove(f"{base}/{ckpt_id}", recursive=True)


def clean_up(job: Store, save_total_limit: int, remove_uncommitted: bool = True,
             spec_hash: str | None = None, fence: Fence | None = None,
             verified: set[str] | None = None) -> list[str]:
    """Apply retention to the job's checkpoints (of ``spec_hash``); returns what was removed.
    With a ``fence``, a writer fenced out by a newer lease holder deletes nothing (LeaseLost)."""
    listing = list_checkpoints(job, spec_hash=spec_hash)
    if fence is not None:
        fence.check()
    removed = []
    for ckpt_id in plan(job, listing, save_total_limit, verified):
        delete_checkpoint(job, ckpt_id)
        removed.append(ckpt_id)
    if remove_uncommitted:
        for name in listing.uncommitted + list(listing.unreadable):
            job.remove(f"{CHECKPOINTS}/{name}", recursive=True)
            removed.append(name)
    return removed
