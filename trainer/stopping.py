"""How a trainer stops: SIGTERM/SIGINT between steps, and at once when its orchestrator dies.

Invariants:
- A signal only sets a flag; ``StopFlag.check`` (between steps, and between evaluation batches)
  raises :class:`Preempted`, so the current step always finishes. With several processes the
  check is collective: all stop at the same step if any was signalled.
- ``watch_parent``: a trainer whose orchestrator (under torchrun: torchrun) is gone exits 137.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from timellm_job.jobs.protocol import ENV_PARENT_PID, ExitCode
from timellm_job.trainer import distributed


class Preempted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class StopFlag:
    """Set by SIGTERM/SIGINT; checked between steps, so the current step always finishes. With
    several processes the check is collective: all stop at the same step if any was signalled."""

    def __init__(self, world: distributed.World = distributed.World()):
        self.signum: int | None = None
        self.world, self.device = world, "cpu"

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if distributed.any_true(self.world, self.signum is not None, self.device):
            raise Preempted(self.signum or signal.SIGTERM)


def watch_parent() -> None:
    """Exit when the orchestrator that started us dies (belt to PR_SET_PDEATHSIG's braces); under
    torchrun, when torchrun dies (it dies with the orchestrator)."""
    parent = os.environ.get(ENV_PARENT_PID)
    if not parent:
        return
    if distributed.under_launcher():
        parent = str(os.getppid())

    def run():
        while True:
            if os.getppid() != int(parent):
                os._exit(ExitCode.KILLED)
            time.sleep(0.5)

    threading.Thread(target=run, name="parent-watch", daemon=True).start()
