"""Which best checkpoint the final test reads, and where to train a lost best again.

Invariants:
- The tested best is the lowest validation loss whose model verifies; one that does not is set
  apart (storage.set_apart: moved, never deleted) and the next is tried.
- When the one set apart was this run's own best, the run trains it again from the newest whole
  checkpoint at or before its position (or from the start), so the job ends as it would have
  (bit for bit on a CPU).
"""

from __future__ import annotations

import logging

from timellm_job.storage.checkpoints import CorruptCheckpoint, load
from timellm_job.storage.manifest import Manifest
from timellm_job.storage.retention import rank_bests
from timellm_job.storage.set_apart import set_apart
from timellm_job.trainer import checkpoint_state
from timellm_job.trainer.checkpoint_state import Progress
from timellm_job.trainer.checkpointing import Checkpointing

log = logging.getLogger(__name__)


def best_to_test(ckpt: Checkpointing, p: Progress) -> tuple[Manifest, dict] | list[int] | None:
    """The job's best (the lowest validation loss) whose model verifies, with its bytes.

    A best that does not verify is set apart (moved, never deleted) and the next is tried. When
    the one set apart was this run's own best, the run trains it again instead: the position to
    resume at or before is returned (a list). None: the job has no best at all."""
    own = own_best_position(p)
    bests = [m for m in ckpt.committed() if m.kind == "best"]
    lost_own = own is not None and not any(m.step == p.best_step for m in bests)  # set apart earlier
    for m in rank_bests(bests):
        try:
            return m, load(ckpt.job, m, [checkpoint_state.MODEL_FILE])
        except CorruptCheckpoint as exc:
            where = set_apart(ckpt.job, m, "; ".join(exc.problems), fence=ckpt.saver.fence if ckpt.saver else None)
            log.info("best checkpoint %s does not verify (%s): set apart as %s", m.id, "; ".join(exc.problems), where)
            if own is not None and m.step == p.best_step and m.val_loss == p.best_val:
                lost_own = True
                break
    if lost_own:
        log.info("training again from the newest whole checkpoint at or before the best (step %s)", p.best_step)
        return own
    return None


def own_best_position(p: Progress) -> list[int] | None:
    """Where this run committed its best: right after validating the epoch it improved in."""
    epoch = next((h["epoch"] for h in reversed(p.history) if h["step"] == p.best_step), None)
    return None if p.best_step is None or epoch is None else [p.best_step, epoch + 1, 0]
