"""Which checkpoints to keep, and the clean-up of our own leftovers.

Invariants:
- Kept: the ``save_total_limit`` newest step checkpoints that pass the size check, the newest
  preempt, the newest imported checkpoint, and the job's best: the best with the *lowest
  validation loss* (never the newest by arrival: an imported run with a worse best does not
  displace the job's own), together with every best that ranks between it and the first best
  known whole by hash (and hashed again before a best below it is deleted: bytes rot after they
  verified), so the previous best stays until a better one has verified. Of each kind,
  the newest checkpoint known whole by its hashes (``verified``: those this process committed,
  hashing the bytes as it wrote them, or read back and verified) is kept too, so a checkpoint
  whose sizes are right but whose bytes are not can never make retention delete the last
  checkpoint known to be whole. ``pinned`` ids (the checkpoint ``results.json`` names) are kept.
- Deletion happens only after a newer checkpoint of the same role has committed: the newest
  valid step checkpoint and the best are never deleted, so a crash during clean-up leaves them.
- A deletion removes the whole checkpoint or leaves it uncommitted, never a torn checkpoint
  (storage.commit_strategy ``delete``).
- A committed checkpoint that fails the size check but is newer than everything kept is left
  alone (on Drive it may be an upload still arriving).
- What cannot be read is never deleted: a manifest that does not parse (torn, still arriving,
  written by hand) or that a newer timellm-job wrote stays where it is, reported by the listing.
  Checkpoints that are not the job's (another spec, a copied folder) are neither counted nor
  removed, and neither is a folder without a manifest under a checkpoint's name (on Drive, a
  checkpoint whose manifest has not arrived yet).
- Only our own temporary leftovers are removed: POSIX ``.tmp-*`` folders, and on object stores
  the writer prefixes of checkpoints that never committed; of a writer's place only when its
  lease generation is not above the cleaner's (a writer fenced out by a newer holder never
  removes that holder's work). The caller runs clean-up only while no write of its own is in
  flight (the single background saver runs it after its own commit), and the lease guarantees
  no other live writer: a writer whose lease generation was taken over deletes nothing (its
  fence is checked first).
"""

from __future__ import annotations

import math

from timellm_job.storage.checkpoints import Listing, check_sizes, list_checkpoints, verify
from timellm_job.storage.commit_strategy import TMP_PREFIX, strategy_for, writer_generation
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import CHECKPOINTS, RESULTS
from timellm_job.storage.lease import Fence
from timellm_job.storage.manifest import MANIFEST, Manifest
from timellm_job.storage.store import Store


def rank_bests(bests: list[Manifest]) -> list[Manifest]:
    """Bests from the job's best down: lowest validation loss first (unknown losses last), the
    newer first among equals."""
    newest_first = sorted(bests, key=Manifest.order, reverse=True)
    return sorted(newest_first, key=lambda m: m.val_loss if m.val_loss is not None and math.isfinite(m.val_loss)
                  else math.inf)


def plan(job: Store, listing: Listing, save_total_limit: int, verified: set[str] | None = None,
         pinned: set[str] | None = None) -> list[str]:
    """Ids of committed checkpoints that retention removes (none of the protected ones)."""
    verified = verified or set()
    by_kind: dict[str, list[Manifest]] = {}
    for m in listing.committed:  # newest first
        by_kind.setdefault(m.kind, []).append(m)
    keep: set[str] = {m.id for m in listing.committed if m.id in (pinned or ())}
    whole_steps = [m for m in by_kind.get("step", []) if not check_sizes(job, m)]
    keep.update(m.id for m in whole_steps[:save_total_limit])
    bests = rank_bests([m for m in by_kind.get("best", []) if not check_sizes(job, m)])
    for i, m in enumerate(bests):
        keep.add(m.id)
        if m.id in verified:  # the previous bests are kept until one at least as good has verified,
            if i + 1 < len(bests) and verify(job, m):  # and is whole still, hashed again before any goes
                continue
            break
    for kind in ("preempt", "imported"):
        whole = [m for m in by_kind.get(kind, []) if not check_sizes(job, m)]
        if whole:
            keep.add(whole[0].id)
    for kind, manifests in by_kind.items():  # the newest known whole by hash, of each kind but the
        if kind == "best":  # best, which is ranked by loss above (down to the first known whole)
            continue
        known = [m for m in manifests if m.id in verified]
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
        if m.order() > newest_kept.order() and check_sizes(job, m):
            continue
        drop.append(m.id)
    return drop


def delete_checkpoint(job: Store, ckpt_id: str, base: str = CHECKPOINTS) -> None:
    strategy_for(job).delete(job, f"{base}/{ckpt_id}")


def _ours(name: str, generation: float) -> bool:
    """A writer's place whose lease generation is not above the cleaner's."""
    found = writer_generation(name)
    return found is not None and found <= generation


def leftovers(job: Store, listing: Listing, generation: float, base: str = CHECKPOINTS) -> list[str]:
    """Our own temporary leftovers under ``base`` (paths relative to the job), of writers whose
    generation is at most ``generation``: POSIX temporary folders, and on object stores the
    writer prefixes (and an earlier version's loose files) of ids that never committed."""
    found = []
    for name in listing.uncommitted:
        if name.startswith(TMP_PREFIX):
            if writer_generation(name) is None or _ours(name, generation):  # deletions, stale folders, older names
                found.append(f"{base}/{name}")
            continue
        if job.backend.renames_folders:
            continue  # a final name without a manifest: maybe a checkpoint still arriving
        entries = job.list_dir(f"{base}/{name}")
        if any(entry == MANIFEST for entry, _, _ in entries):  # committed meanwhile: not a leftover
            continue
        for entry, kind, _ in entries:
            if kind == "directory" and _ours(entry, generation):
                found.append(f"{base}/{name}/{entry}")
            elif kind == "file" and writer_generation(entry) is None:  # an earlier version's files
                found.append(f"{base}/{name}/{entry}")
    return found


def clean_up(job: Store, save_total_limit: int, remove_uncommitted: bool = True,
             spec_hash: str | set[str] | None = None, fence: Fence | None = None,
             verified: set[str] | None = None) -> list[str]:
    """Apply retention to the job's checkpoints (of ``spec_hash``); returns what was removed.
    With a ``fence``, a writer fenced out by a newer lease holder deletes nothing (LeaseLost)."""
    listing = list_checkpoints(job, spec_hash=spec_hash)
    results = _results(job)
    pinned = {results["best_checkpoint"]} if isinstance(results.get("best_checkpoint"), str) else set()
    if fence is not None:
        fence.check()
    removed = []
    for ckpt_id in plan(job, listing, save_total_limit, verified, pinned):
        delete_checkpoint(job, ckpt_id)
        removed.append(ckpt_id)
    if remove_uncommitted:
        generation = fence.generation if fence is not None else math.inf
        for path in leftovers(job, listing, generation):
            job.remove(path, recursive=True)
            removed.append(path.split("/", 1)[1])
    return removed


def _results(job: Store) -> dict:
    try:
        doc = read_json(job, RESULTS)
    except ValueError:  # a torn results.json pins nothing; it is rewritten by the final test
        return {}
    return doc if isinstance(doc, dict) else {}
