"""Which best checkpoint the final test reads, and training a lost best again.

Part of the trainer (trainer.loop's ``Trainer`` mixes it in; it uses the trainer's job, progress,
saver and fence).

Invariants:
- The tested best is the lowest validation loss whose model verifies; one that does not is set
  apart (storage.set_apart: moved, never deleted) and the next is tried.
- When the one set apart was this run's own best, the run trains it again from the newest whole
  checkpoint at or before its position (or from the start), so the job ends as it would have
  (bit for bit on a CPU).
"""

from __future__ import annotations

import sys

from timellm_job.storage import list_checkpoints
from timellm_job.storage.checkpoints import CorruptCheckpoint, load
from timellm_job.storage.manifest import Manifest
from timellm_job.storage.retention import rank_bests
from timellm_job.storage.set_apart import set_apart
from timellm_job.trainer import checkpoint_state


class BestCheckpoint:
    def _best_to_test(self) -> tuple[Manifest, dict] | list[int] | None:
        """The job's best (the lowest validation loss) whose model verifies, with its bytes.

        A best that does not verify is set apart (moved, never deleted) and the next is tried.
        When the one set apart was this run's own best, the run trains it again instead: the
        position to resume at or before is returned (a list), and the loop goes on from the
        newest whole checkpoint there (or from the start), so the job ends as it would have
        (bit for bit on a CPU). None: the job has no best at all."""
        p = self.progress
        own = self._own_best_position()
        bests = [m for m in list_checkpoints(self.job, spec_hash=self.hashes).committed if m.kind == "best"]
        lost_own = own is not None and not any(m.step == p.best_step for m in bests)  # set apart earlier
        for m in rank_bests(bests):
            try:
                return m, load(self.job, m, [checkpoint_state.MODEL_FILE])
            except CorruptCheckpoint as exc:
                where = set_apart(self.job, m, "; ".join(exc.problems), fence=self.fence)
                print(f"best checkpoint {m.id} does not verify ({'; '.join(exc.problems)}): set apart as {where}",
                      file=sys.stderr, flush=True)
                if own is not None and m.step == p.best_step and m.val_loss == p.best_val:
                    lost_own = True
                    break
        if lost_own:
            print(f"training again from the newest whole checkpoint at or before the best (step {p.best_step})",
                  file=sys.stderr, flush=True)
            return own
        return None

    def _own_best_position(self) -> list[int] | None:
        """Where this run committed its best: right after validating the epoch it improved in."""
        p = self.progress
        epoch = next((h["epoch"] for h in reversed(p.history) if h["step"] == p.best_step), None)
        return None if p.best_step is None or epoch is None else [p.best_step, epoch + 1, 0]

    def restart_from(self, at_or_before: list[int]) -> None:
        """Train again from the newest whole checkpoint at or before ``at_or_before`` (the lost
        best's position), or from the start when there is none. A checkpoint at exactly that
        position holds the best's own state (both are taken after that epoch's validation, with
        nothing computed between them): the best is committed again from it at once."""
        self._fresh_training_state()
        self.resume(at_or_before=at_or_before)
        if self.progress.order() == list(at_or_before) and self.progress.best_step == at_or_before[0]:
            self.save("best", wait=True)
