"""How the orchestrator starts a trainer process (a cold one, or a warm spare).

Invariants:
- It runs in a session of its own (signals and kills reach it as a group, and a terminal's
  Ctrl-C reaches only the orchestrator, which forwards it) and dies with the thread that started
  it: PR_SET_PDEATHSIG=SIGKILL on Linux (the trainer also watches ``ENV_PARENT_PID``).
- Its environment is the orchestrator's with what every attempt sets (:func:`attempt_env`);
  only the heartbeat path is the attempt's own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from timellm_job.jobs.protocol import ENV_PARENT_PID

PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def attempt_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A trainer's environment, all but its heartbeat path: ours, ``env`` (thread counts), and
    what every attempt sets."""
    return {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # ours is in the terminal; not in the log
            **(env or {}), ENV_PARENT_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"}


def start(argv: list[str], output, env: dict[str, str], stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """``argv`` with its stdout and stderr to ``output`` (a file), in its own session."""
    return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, stdin=stdin, env=env,
                            start_new_session=True,
                            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
