"""What the supervisor does after an attempt ends: a pure function, table-tested.

``decide(outcome, history, run, stopping)`` returns :class:`Restart` (after a backoff) or
:class:`End` (a phase, a reason, submit's exit code). It reads no clock and touches nothing:
the supervisor observes (orchestrator.outcome.classify), calls it, and acts. The transitions
are the lifecycle drawn in jobs.status, in this order:

1. completed -> End(completed, exit 0); bad input -> End(failed, exit 2);
2. out of memory without a smaller plan (or train.micro_batch_size not auto) -> End(failed, 1);
3. we were stopping it (SIGTERM/SIGINT, ``timellm-job stop``) -> End(preempted, 143/130), with
   why no checkpoint was written where none was;
4. a crash loop (``run.crash_loop_limit`` failed attempts in a row ending at the same step with
   the same reason) -> End(failed, 1); the restart budget of this submit spent -> End(failed, 1);
5. anything else (killed, crashed, hung, fenced while we still hold the lease, out of memory
   with a smaller plan) -> Restart, after ``backoff_initial_s * 2**n`` (at most
   ``backoff_max_s``), ``n`` the restarts in a row that made no progress.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from timellm_job.jobs import Phase
from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.spec import RunSpec
from timellm_job.jobs.status import Attempt
from timellm_job.orchestrator.outcome import ExitClass, Outcome, Stopping


@dataclass(frozen=True)
class History:
    """What the decision needs of the past: the job's attempts (the one just ended last, with
    its exit code, reason and end step), and this submit's restart counters."""

    attempts: Sequence[Attempt]
    restarts_here: int = 0  # restarts made by this submit (the budget counts these)
    restarts_in_a_row: int = 0  # restarts in a row that made no progress (the backoff doubles)


@dataclass(frozen=True)
class Restart:
    delay_s: float
    reason: str
    restarts_in_a_row: int  # the counter after this restart


@dataclass(frozen=True)
class End:
    phase: Phase
    reason: str | None
    exit_code: ExitCode


def stopped(stopping: Stopping, no_checkpoint: str | None = None) -> End:
    """The job ends preempted: by the signal we were stopping it with."""
    why = f"stopped by {signal.Signals(stopping.signum).name}" + (f"; {no_checkpoint}" if no_checkpoint else "")
    return End(Phase.PREEMPTED, why, ExitCode.SIGINT if stopping.signum == signal.SIGINT else ExitCode.SIGTERM)


def crash_loop(attempts: Sequence[Attempt], limit: int) -> bool:
    recent = list(attempts)[-limit:]
    if len(recent) < limit or any(a.exit_code == 0 for a in recent):
        return False
    return len({(a.end_step, a.reason) for a in recent}) == 1


def made_progress(attempts: Sequence[Attempt]) -> bool:
    """The attempt just ended got further than the one before it (a first attempt did)."""
    return len(attempts) < 2 or (attempts[-1].end_step or 0) > (attempts[-2].end_step or 0)


def backoff_s(run: RunSpec, restarts_in_a_row: int) -> float:
    return min(run.backoff_max_s, run.backoff_initial_s * (2 ** restarts_in_a_row))


def decide(outcome: Outcome, history: History, run: RunSpec, stopping: Stopping | None) -> Restart | End:
    if outcome.exit_class is ExitClass.COMPLETED:
        return End(Phase.COMPLETED, None, ExitCode.OK)
    if outcome.exit_class is ExitClass.BAD_INPUT:
        return End(Phase.FAILED, outcome.reason, ExitCode.BAD_INPUT)
    if outcome.exit_class is ExitClass.OUT_OF_MEMORY and not outcome.smaller_plan:
        return End(Phase.FAILED, outcome.reason, ExitCode.FAILED)  # the same plan would fail again
    if stopping is not None:
        return stopped(stopping, outcome.no_checkpoint)
    attempts = history.attempts
    if crash_loop(attempts, run.crash_loop_limit):
        return End(Phase.FAILED, f"crash loop: {outcome.reason}, {run.crash_loop_limit} times at step "
                                 f"{attempts[-1].end_step} with no progress", ExitCode.FAILED)
    if history.restarts_here >= run.max_restarts:
        return End(Phase.FAILED, f"restart budget spent ({run.max_restarts}) in this submit; "
                                 f"last: {outcome.reason}", ExitCode.FAILED)
    in_a_row = 0 if made_progress(attempts) else history.restarts_in_a_row + 1
    return Restart(backoff_s(run, in_a_row), outcome.reason, in_a_row)
