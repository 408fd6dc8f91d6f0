"""One attempt: a trainer subprocess, its heartbeat, its log, and how it ended.

Invariants:
- The trainer is started as orchestrator.children says (its own process group, dies with its
  orchestrator), cold, or by claiming a warm spare (orchestrator.spare) that has done its
  imports; either way the same command and environment.
- Its exit is seen at once: a thread waits on the child and sets ``exited``.
- Its stdout and stderr go to a local log file, which the supervisor copies to the job folder.
- Its heartbeat is read through jobs.protocol.Heartbeat; a missing or torn one reads as None.
- Under torchrun (``launcher``) the trainers are torchrun's children, each in a session of its
  own: signals and kills go to every descendant, not just the group.
- How it ended is orchestrator.outcome's to say; what follows, orchestrator.policy's.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil

from timellm_job.jobs.protocol import ENV_HEARTBEAT, Heartbeat
from timellm_job.orchestrator import children
from timellm_job.orchestrator.oom_evidence import OomWatch
from timellm_job.orchestrator.spare import Spare


class TrainerProcess:
    def __init__(self, argv: list[str], workdir: Path, attempt: int, env: dict[str, str] | None = None,
                 launcher: bool = False, spare: Spare | None = None):
        """``spare``: a warm spare to claim for this attempt (killed if it cannot be: then cold)."""
        self.attempt, self.launcher = attempt, launcher
        self.log_path = workdir / f"attempt-{attempt:03d}.log"
        self.heartbeat_path = workdir / f"heartbeat-{attempt:03d}.json"
        self.heartbeat_path.unlink(missing_ok=True)
        full_env = {**children.attempt_env(env), ENV_HEARTBEAT: str(self.heartbeat_path)}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.started_at = time.time()
        claimed = spare.claim(argv, full_env, self.log_path) if spare is not None else None
        self.warm = claimed is not None
        self.proc = claimed or children.start(argv, self.log, full_env)
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
