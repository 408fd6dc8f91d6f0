"""What a trainer does on SIGTERM/SIGINT: commit the step it stopped at, or say why not.

Part of the trainer (trainer.loop's ``Trainer`` mixes it in; it uses the trainer's saver,
progress, heartbeat and world).

Invariants:
- A step committed already (or being committed) is not committed twice: the write in flight is
  waited for.
- A preempt checkpoint that would not be committed within the grace period (judged by the newest
  commit of this same state to the same store) is not started: the heartbeat's
  ``preempt_skipped`` says why, and the newest whole checkpoint is named, instead of a write
  killed half-way. Rank 0 decides for all ranks.
- Exit 143 for SIGTERM, 130 for SIGINT (jobs.protocol.ExitCode).
"""

from __future__ import annotations

import signal
import sys

from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.storage import list_checkpoints
from timellm_job.trainer import distributed


class Preemption:
    def _preempt_would_not_fit(self) -> str | None:
        """Why a preempt checkpoint would not be committed within the grace period (None: it
        would, or nothing tells otherwise). The estimate is the newest commit's own time: the same
        state, to the same store. Rank 0 decides for all ranks."""
        why = None
        saver = self.saver
        if saver is not None:
            budget = 0.8 * self.spec.run.grace_period_s  # the rest: finishing, exiting
            if not saver.wait_for(budget):  # a write in flight finishes first, if it can in time
                why = f"a checkpoint write in flight did not finish within {budget:.0f} s"
            elif saver.last_commit_s is not None and saver.last_commit_s > budget:
                why = (f"the newest commit of this state took {saver.last_commit_s:.0f} s, more than the "
                       f"{self.spec.run.grace_period_s:.0f} s grace period allows")
            if why is not None:
                newest = list_checkpoints(self.job, spec_hash=self.hashes).committed
                ref = f"{newest[0].id} (step {newest[0].step})" if newest else "none"
                why += (f"; the newest whole checkpoint is {ref}, "
                        f"{self.progress.global_step - (newest[0].step if newest else 0)} steps before this one")
        return distributed.broadcast(self.world, why)

    def _preempted(self, signum: int) -> int:
        p = getattr(self, "progress", None)
        if p is not None and hasattr(self, "saver"):
            covered = self.saver is not None and self.saver.covers(p.order())  # rank 0's saver decides
            covered = distributed.broadcast(self.world, covered)
            if covered:  # this very step is committed or being committed: finish it, write nothing new
                if self.saver is not None:
                    self.saver.wait()
                distributed.barrier(self.world)
                if self.world.main:
                    print(f"preempted by signal {signum}: step {p.global_step} is committed already "
                          f"(no second checkpoint of it)", file=sys.stderr, flush=True)
            else:
                doomed = self._preempt_would_not_fit()
                if doomed is None:
                    self.save("preempt", wait=True)
                    if self.world.main:
                        print(f"preempted by signal {signum}: committed a preempt checkpoint at step {p.global_step}",
                              file=sys.stderr, flush=True)
                elif self.world.main:  # say so, rather than be killed half-way through the write
                    self.heartbeat.beat(force=True, preempt_skipped=doomed)
                    print(f"preempted by signal {signum}: no preempt checkpoint: {doomed}", file=sys.stderr, flush=True)
        self._flush_reports()
        self.heartbeat.beat(force=True, activity=Activity.PREEMPTED)
        return ExitCode.SIGINT if signum == signal.SIGINT else ExitCode.SIGTERM
