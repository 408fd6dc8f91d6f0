"""One attempt: a trainer subprocess, its heartbeat, its log, and how it ended.

Invariants:
- The trainer runs in its own process group (so it can be signalled or killed as a whole) and
  dies with its orchestrator: PR_SET_PDEATHSIG=SIGKILL on Linux, and the trainer also watches
  its parent pid (``TIMELLM_JOB_PARENT_PID``).
- Its exit is seen at once: a thread waits on the child and sets ``exited``.
- Its stdout and stderr go to a local log file, which the supervisor copies to the job folder.
- Exit classes (:class:`ExitClass`) decide what the supervisor does; see ``classify``.
- Under torchrun (``launcher``) the trainers are torchrun's children, each in a session of its
  own: signals and kills go to every descendant, not just the group; and torchrun's exit code
  (1 for any failure) is replaced by the first failed rank's, read from torchrun's error
  summary, or by rank 0's own, read from its heartbeat.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from orchestrator.oom_evidence import OomWatch

PR_SET_PDEATHSIG = 1


class ExitClass(str, enum.Enum):
    COMPLETED = "completed"  # 0: nothing more to do
    BAD_INPUT = "bad_input"  # 2: never worth a restart
    PREEMPTED = "preempted"  # 143/130 after our own SIGTERM/SIGINT
    KILLED = "killed"  # by a signal (SIGKILL: an external kill or the OOM killer)
    HUNG = "hung"  # no heartbeat for heartbeat_timeout_s; we killed it
    OUT_OF_MEMORY = "out_of_memory"  # 4: the trainer's diagnosis (card, peak, plan, what to change)
    FENCED = "fenced"  # 3: a newer lease generation holds the job; the trainer wrote nothing more
    CRASHED = "crashed"  # any other non-zero exit (CUDA errors included)


@dataclass
class Outcome:
    exit_class: ExitClass
    exit_code: int | None
    signal: str | None
    reason: str


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class TrainerProcess:
    def __init__(self, argv: list[str], workdir: Path, attempt: int, env: dict[str, str] | None = None,
                 launcher: bool = False):
        self.attempt, self.launcher = attempt, launcher
        self.log_path = workdir / f"attempt-{attempt:03d}.log"
        self.heartbeat_path = workdir / f"heartbeat-{attempt:03d}.json"
        self.heartbeat_path.unlink(missing_ok=True)
        full_env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # ours is in the terminal; not in the log
                    **(env or {}), "TIMELLM_JOB_HEARTBEAT": str(self.heartbeat_path),
                    "TIMELLM_JOB_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.started_at = time.time()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, start_new_session=True,
                                     preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
        self.pid = self.proc.pid
        self.oom_watch = OomWatch(self.pid)
        self.exited = threading.Event()
        self.returncode: int | None = None
        threading.Thread(target=self._wait, name=f"wait-trainer-{self.pid}", daemon=True).start()

    def _wait(self) -> None:
        self.returncode = self.proc.wait()
        self.log.close()
        self.exited.set()

    def heartbeat(self) -> dict | None:
        try:
            return json.loads(self.heartbeat_path.read_text())
        except (OSError, ValueError):
            return None

    def heartbeat_age(self) -> float:
        beat = self.heartbeat()
        last = beat.get("time", self.started_at) if beat else self.started_at
        return max(0.0, time.time() - last)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def signal_group(self, sig: int) -> None:
        """The trainer's process group and every descendant (torchrun's workers have sessions
        of their own)."""
        below = self.descendants()
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in below:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        self.exited.wait(10)

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - n_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def launcher_exit(returncode: int, log_tail: str, heartbeat: dict | None) -> tuple[int, str]:
    """torchrun's exit code -> the trainers' (and which rank it was): the first failed rank's
    from torchrun's error summary, else rank 0's own from its heartbeat."""
    if returncode < 0:
        return returncode, ""  # torchrun itself was killed
    found = ROOT_CAUSE.findall(log_tail)
    if found:
        rank, code = found[-1]
        return int(code), f"rank {rank}: "
    reported = (heartbeat or {}).get("exit_code")
    if returncode != 0 and isinstance(reported, int):
        return reported, ""
    return returncode, ""


EXIT_OUT_OF_MEMORY = 4  # the trainer's own code for "out of memory, diagnosed"
EXIT_FENCED = 3  # the trainer found its lease generation taken over (it committed nothing more)


def classify(returncode: int, signalled_by_us: int | None, hung_for: float | None, log_tail: str,
             launcher_heartbeat: dict | None = None, launcher: bool = False, host_oom: str | None = None) -> Outcome:
    """How an attempt ended, in the supervisor's terms (``launcher``: the trainer ran under
    torchrun, whose last heartbeat from rank 0 is ``launcher_heartbeat``; ``host_oom``: the
    kernel's traces of an out-of-memory kill, see oom_evidence)."""
    if launcher and hung_for is None:
        returncode, rank = launcher_exit(returncode, log_tail, launcher_heartbeat)
        outcome = classify(returncode, signalled_by_us, None, log_tail, host_oom=host_oom)
        outcome.reason = rank + outcome.reason
        return outcome
    if hung_for is not None:
        return Outcome(ExitClass.HUNG, returncode, "SIGKILL", f"hung: no heartbeat for {hung_for:.0f} s; killed")
    if returncode == 0:
        return Outcome(ExitClass.COMPLETED, 0, None, "completed")
    if returncode == 2:
        last = [ln for ln in log_tail.strip().splitlines() if ln.strip()]
        return Outcome(ExitClass.BAD_INPUT, 2, None, f"bad input: {last[-1] if last else 'see the log'}")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if signalled_by_us is not None:
            return Outcome(ExitClass.PREEMPTED, None, name, f"killed by {name} while stopping: no checkpoint written")
        if name == "SIGKILL" and host_oom:
            return Outcome(ExitClass.KILLED, None, name,
                           f"killed by the kernel's out-of-memory killer (host RAM is exhausted): {host_oom}")
        why = {"SIGKILL": "killed by SIGKILL (an external kill; no trace of the out-of-memory killer was seen)",
               "SIGSEGV": "segmentation fault", "SIGABRT": "aborted (SIGABRT)",
               "SIGBUS": "bus error"}.get(name, f"killed by {name}")
        return Outcome(ExitClass.KILLED, None, name, why)
    if returncode in (143, 130) and signalled_by_us is not None:
        said = [ln.split(": ", 1)[1] for ln in log_tail.splitlines() if ln.startswith("preempted by signal ")]
        if said and said[-1].startswith("no preempt checkpoint"):
            return Outcome(ExitClass.PREEMPTED, returncode, None, f"preempted: {said[-1]}")
        return Outcome(ExitClass.PREEMPTED, returncode, None, "preempted: the step it stopped at is committed")
    if returncode in (143, 130):
        return Outcome(ExitClass.KILLED, returncode, None, "the trainer alone received SIGTERM/SIGINT")
    if returncode == EXIT_FENCED:
        return Outcome(ExitClass.FENCED, returncode, None, "fenced: a newer holder of the job's lease exists")
    if returncode == EXIT_OUT_OF_MEMORY:
        said = [ln.strip() for ln in log_tail.splitlines() if ln.strip().startswith("out of memory")]
        return Outcome(ExitClass.OUT_OF_MEMORY, returncode, None, said[-1] if said else "out of memory")
    lowered = log_tail.lower()
    if "no space left" in lowered or "errno 28" in lowered or "disk is full" in lowered:
        kind = ("the store is full (no space left on the device) while writing: free space there, lower "
                "storage.save_total_limit, or point storage.root elsewhere")
    elif "out of memory" in lowered:
        kind = "CUDA out of memory" if "cuda" in lowered else "out of memory"
    elif "cuda error" in lowered or "cublas" in lowered or "nccl" in lowered:
        kind = "CUDA error"
    else:
        lines = [ln for ln in log_tail.strip().splitlines() if ln.strip() and not ln.startswith("step ")]
        kind = lines[-1][:300] if lines else "no output"
    return Outcome(ExitClass.CRASHED, returncode, None, f"crashed (exit {returncode}): {kind}")
