"""What a trainer does on SIGTERM/SIGINT: commit the step it stopped at, or say why not.

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

import logging
import signal

from timellm_job.jobs.protocol import ExitCode
from timellm_job.trainer import distributed
from timellm_job.trainer.checkpointing import Checkpointing
from timellm_job.trainer.components import TrainingState
from timellm_job.trainer.memory import MemoryPlan

log = logging.getLogger(__name__)


def would_not_fit(ckpt: Checkpointing, state: TrainingState) -> str | None:
    """Why a preempt checkpoint would not be committed within the grace period (None: it would,
    or nothing tells otherwise). The estimate is the newest commit's own time: the same state, to
    the same store. Rank 0 decides for all ranks."""
    why = None
    saver, grace = ckpt.saver, ckpt.spec.run.grace_period_s
    if saver is not None:
        budget = 0.8 * grace  # the rest: finishing, exiting
        if not saver.wait_for(budget):  # a write in flight finishes first, if it can in time
            why = f"a checkpoint write in flight did not finish within {budget:.0f} s"
        elif saver.last_commit_s is not None and saver.last_commit_s > budget:
            why = (f"the newest commit of this state took {saver.last_commit_s:.0f} s, more than the "
                   f"{grace:.0f} s grace period allows")
        if why is not None:
            newest = ckpt.committed()
            ref = f"{newest[0].id} (step {newest[0].step})" if newest else "none"
            why += (f"; the newest whole checkpoint is {ref}, "
                    f"{state.progress.global_step - (newest[0].step if newest else 0)} steps before this one")
    return distributed.broadcast(ckpt.world, why)


def commit_stopped_step(ckpt: Checkpointing, state: TrainingState, plan: MemoryPlan | None, signum: int) -> None:
    """Commit the step the trainer stopped at (every rank calls it), unless it is committed
    already or its commit would not fit the grace period (then the heartbeat says why)."""
    p, world = state.progress, ckpt.world
    covered = distributed.broadcast(world, ckpt.saver is not None and ckpt.saver.covers(p.order()))  # rank 0 decides
    if covered:  # this very step is committed or being committed: finish it, write nothing new
        if ckpt.saver is not None:
            ckpt.saver.wait()
        distributed.barrier(world)
        if world.main:
            log.info("preempted by signal %d: step %d is committed already (no second checkpoint of it)",
                     signum, p.global_step)
        return
    doomed = would_not_fit(ckpt, state)
    if doomed is None:
        ckpt.save(state, "preempt", plan, wait=True)
        if world.main:
            log.info("preempted by signal %d: committed a preempt checkpoint at step %d", signum, p.global_step)
    elif world.main:  # say so, rather than be killed half-way through the write
        ckpt.reporter.beat(force=True, preempt_skipped=doomed)
        log.info("preempted by signal %d: no preempt checkpoint: %s", signum, doomed)


def exit_code(signum: int) -> ExitCode:
    return ExitCode.SIGINT if signum == signal.SIGINT else ExitCode.SIGTERM
