"""What the terminal running ``submit`` shows while a job runs, from the heartbeat it folds.

On a terminal (stderr is a TTY): one live rich bar for the phase the trainer is in (starting,
loading, training with step/total, epoch, loss, lr, steps/s and ETA; validating and testing with
batches), with every orchestrator message (restarts, preemptions, plans: the ``timellm_job``
log records, written to stderr, which the live bar redirects) printed above it as it happens. Elsewhere (a startup script, nohup, Colab's ``!``): no carriage returns, a plain line
at every phase change and every ``TIMELLM_JOB_PROGRESS_EVERY_S`` seconds (30) while training.

Invariants: the view only reads the status and heartbeat; it never decides anything, and a
broken terminal never stops a job (errors while drawing are dropped).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from timellm_job.jobs.messages import duration
from timellm_job.jobs.protocol import Heartbeat, TrainerActivity

log = logging.getLogger(__name__)


def describe(beat: Heartbeat) -> tuple[str, int | None, int | None, str]:
    """(what the trainer does, done, total, details) of a heartbeat, for a bar or a line."""
    doing = beat.activity or ("starting" if beat.busy == "starting" else "loading")
    if beat.busy and doing in ("loading", "starting"):
        doing = beat.busy
    if beat.evaluating:
        return doing, beat.eval_batch, beat.eval_batches, f"epoch {beat.epoch or 0}"
    if doing != TrainerActivity.TRAINING:
        got = beat.download_bytes
        return doing, None, None, (f"{got / 1e9:.2f} GB downloaded" if got else "")
    step, total, rate = beat.step, beat.total_steps, beat.steps_per_s
    parts = [f"epoch {beat.epoch or 0}"]
    if beat.loss is not None:
        parts.append(f"loss {beat.loss:.4f}")
    if beat.lr is not None:
        parts.append(f"lr {beat.lr:.2e}")
    if rate:
        parts.append(f"{rate:.2f} steps/s")
        if step is not None and total:
            parts.append(f"ETA {duration((total - step) / rate)}")
    return doing, step, total, " ".join(parts)


class ProgressView:
    def __init__(self, stream=None, every_s: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else float(os.environ.get("TIMELLM_JOB_PROGRESS_EVERY_S", "30"))
        self.console = Console(file=self.stream)
        self.progress: Progress | None = None
        self.task = None
        self.last_line, self.last_phase = 0.0, None

    def update(self, beat: Heartbeat | None) -> None:
        if beat is None:
            return
        try:
            phase, done, total, details = describe(beat)
            if self.tty:
                self._draw(phase, done, total, details)
            else:
                self._line(phase, done, total, details)
        except Exception:  # noqa: BLE001 - drawing must never stop a job
            pass

    def _draw(self, phase, done, total, details) -> None:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.completed:.0f}/{task.total}"), TextColumn("{task.fields[details]}"),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task(phase, total=None, details="")
        self.progress.update(self.task, description=phase, completed=done or 0, total=total, details=details)

    def _line(self, phase, done, total, details) -> None:
        now = time.time()
        if phase == self.last_phase and now - self.last_line < self.every_s:
            return
        self.last_line, self.last_phase = now, phase
        where = f" {done}/{total}" if done is not None and total else ""
        log.info(f"{phase}{where}" + (f" {details}" if details else ""))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
