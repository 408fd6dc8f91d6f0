"""How an attempt ended, in the supervisor's terms: pure functions of what was observed.

Invariants:
- :func:`classify` is a function of the trainer's exit status, whether we were stopping it (and
  how), whether it hung, the tail of its log (for the words of a reason only) and its last
  heartbeat (jobs.protocol.Heartbeat): no I/O, no clock. Its :class:`Outcome` is final: what
  the supervisor decides (orchestrator.policy) reads its typed fields, never its reason text.
- Under torchrun (``launcher``) torchrun's exit code (1 for any failure) is replaced by the
  first failed rank's, read from torchrun's error summary, or by rank 0's own, read from its
  heartbeat.
"""

from __future__ import annotations

import enum
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

from timellm_job.jobs.protocol import STOPPED, ExitCode, Heartbeat


class ExitClass(str, enum.Enum):
    COMPLETED = "completed"  # 0: nothing more to do
    BAD_INPUT = "bad_input"  # 2: never worth a restart
    PREEMPTED = "preempted"  # 143/130 after our own SIGTERM/SIGINT (or killed while we stopped it)
    KILLED = "killed"  # by a signal (SIGKILL: an external kill or the OOM killer)
    HUNG = "hung"  # no heartbeat for heartbeat_timeout_s; we killed it
    OUT_OF_MEMORY = "out_of_memory"  # 4: the trainer's diagnosis (card, peak, plan, what to change)
    FENCED = "fenced"  # 3: a newer lease generation holds the job; the trainer wrote nothing more
    CRASHED = "crashed"  # any other non-zero exit (CUDA errors included)


@dataclass(frozen=True)
class Stopping:
    """How we were stopping the trainer when it ended (None where we were not)."""

    signum: int  # SIGTERM or SIGINT: what we forwarded
    forced: bool = False  # a second signal killed it at once
    grace_over: bool = False  # the grace period ran out and we killed it
    grace_period_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    exit_class: ExitClass
    exit_code: int | None
    signal: str | None
    reason: str
    no_checkpoint: str | None = None  # stopped without a preempt checkpoint: why
    smaller_plan: bool = False  # out of memory, and the diagnosis found a smaller plan to try


ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def launcher_exit(returncode: int, log_tail: str, heartbeat: Heartbeat | None) -> tuple[int, str]:
    """torchrun's exit code -> the trainers' (and which rank it was): the first failed rank's
    from torchrun's error summary, else rank 0's own from its heartbeat."""
    if returncode < 0:
        return returncode, ""  # torchrun itself was killed
    found = ROOT_CAUSE.findall(log_tail)
    if found:
        rank, code = found[-1]
        return int(code), f"rank {rank}: "
    reported = heartbeat.exit_code if heartbeat else None
    if returncode != 0 and isinstance(reported, int):
        return reported, ""
    return returncode, ""


def classify(returncode: int, stopping: Stopping | None, hung_for: float | None, log_tail: str,
             heartbeat: Heartbeat | None = None, launcher: bool = False, host_oom: str | None = None,
             newest: Callable[[], str] = str) -> Outcome:
    """How an attempt ended (``launcher``: the trainer ran under torchrun; ``host_oom``: the
    kernel's traces of an out-of-memory kill, see oom_evidence; ``newest``: where a resume
    would start, asked only when a stop lost the step it stopped at)."""
    if launcher and hung_for is None:
        returncode, rank = launcher_exit(returncode, log_tail, heartbeat)
        outcome = classify(returncode, stopping, None, log_tail, heartbeat, host_oom=host_oom, newest=newest)
        return Outcome(outcome.exit_class, outcome.exit_code, outcome.signal, rank + outcome.reason,
                       outcome.no_checkpoint, outcome.smaller_plan)
    if hung_for is not None:
        return Outcome(ExitClass.HUNG, returncode, "SIGKILL", f"hung: no heartbeat for {hung_for:.0f} s; killed")
    if returncode == ExitCode.OK:
        return Outcome(ExitClass.COMPLETED, 0, None, "completed")
    if returncode == ExitCode.BAD_INPUT:
        last = [ln for ln in log_tail.strip().splitlines() if ln.strip()]
        return Outcome(ExitClass.BAD_INPUT, 2, None, f"bad input: {last[-1] if last else 'see the log'}")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if stopping is not None:
            why = ("stopped at once by a second signal: no checkpoint written" if stopping.forced else
                   f"killed after the grace period ({stopping.grace_period_s:.0f} s): no checkpoint written"
                   if stopping.grace_over else f"killed by {name} while stopping: no checkpoint written") + newest()
            return Outcome(ExitClass.PREEMPTED, None, name, why, no_checkpoint=why)
        if name == "SIGKILL" and host_oom:
            return Outcome(ExitClass.KILLED, None, name,
                           f"killed by the kernel's out-of-memory killer (host RAM is exhausted): {host_oom}")
        why = {"SIGKILL": "killed by SIGKILL (an external kill; no trace of the out-of-memory killer was seen)",
               "SIGSEGV": "segmentation fault", "SIGABRT": "aborted (SIGABRT)",
               "SIGBUS": "bus error"}.get(name, f"killed by {name}")
        return Outcome(ExitClass.KILLED, None, name, why)
    if returncode in STOPPED and stopping is not None:
        skipped = heartbeat.preempt_skipped if heartbeat else None
        if skipped:
            return Outcome(ExitClass.PREEMPTED, returncode, None, f"preempted: no preempt checkpoint: {skipped}",
                           no_checkpoint=f"no preempt checkpoint: {skipped}")
        return Outcome(ExitClass.PREEMPTED, returncode, None, "preempted: the step it stopped at is committed")
    if returncode in STOPPED:
        return Outcome(ExitClass.KILLED, returncode, None, "the trainer alone received SIGTERM/SIGINT")
    if returncode == ExitCode.FENCED:
        return Outcome(ExitClass.FENCED, returncode, None, "fenced: a newer holder of the job's lease exists")
    if returncode == ExitCode.OUT_OF_MEMORY:
        said = [ln.strip() for ln in log_tail.splitlines() if ln.strip().startswith("out of memory")]
        oom = heartbeat.oom if heartbeat else None
        return Outcome(ExitClass.OUT_OF_MEMORY, returncode, None, said[-1] if said else "out of memory",
                       smaller_plan=bool((oom or {}).get("smaller_plan")))
    return Outcome(ExitClass.CRASHED, returncode, None, f"crashed (exit {returncode}): {crash_kind(log_tail)}")


def crash_kind(log_tail: str) -> str:
    """What a crash was, in a few words, from the tail of the trainer's log."""
    lowered = log_tail.lower()
    if "no space left" in lowered or "errno 28" in lowered or "disk is full" in lowered:
        return ("the store is full (no space left on the device) while writing: free space there, lower "
                "storage.save_total_limit, or point storage.root elsewhere")
    if "out of memory" in lowered:
        return "CUDA out of memory" if "cuda" in lowered else "out of memory"
    if "cuda error" in lowered or "cublas" in lowered or "nccl" in lowered:
        return "CUDA error"
    lines = [ln for ln in log_tail.strip().splitlines() if ln.strip() and not ln.startswith("step ")]
    return lines[-1][:300] if lines else "no output"
