"""One attempt: a trainer subprocess, its heartbeat, its log, and how it ended.

Invariants:
- The trainer runs in its own process group (so it can be signalled or killed as a whole) and
  dies with its orchestrator: PR_SET_PDEATHSIG=SIGKILL on Linux, and the trainer also watches
  its parent pid (``ENV_PARENT_PID``).
- Its exit is seen at once: a thread waits on the child and sets ``exited``.
- Its stdout and stderr go to a local log file, which the supervisor copies to the job folder.
- Its heartbeat is read through jobs.protocol.Heartbeat; a missing or torn one reads as None.
- Under torchrun (``launcher``) the trainers are torchrun's children, each in a session of its
  own: signals and kills go to every descendant, not just the group.
- How it ended is orchestrator.outcome's to say; what follows, orchestrator.policy's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from timellm_job.jobs.protocol import ENV_HEARTBEAT, ENV_PARENT_PID, Heartbeat
from timellm_job.orchestrator.oom_evidence import OomWatch

PR_SET_PDEATHSIG = 1


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
                    **(env or {}), ENV_HEARTBEAT: str(self.heartbeat_path),
                    ENV_PARENT_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
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

    def heartbeat(self) -> Heartbeat | None:
        try:
            return Heartbeat.parse(self.heartbeat_path.read_bytes())
        except OSError:
            return None

    def heartbeat_age(self) -> float:
        beat = self.heartbeat()
        last = beat.time if beat and beat.time is not None else self.started_at
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
