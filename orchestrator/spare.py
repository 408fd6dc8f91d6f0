"""Warm spares: trainer processes that do their imports before their attempt begins.

Most of a trainer's start-up is imports (torch, the loop, transformers' model classes: 3.3 s of
the 3.7 s before the tiny job's first step on 2 cores). A spare (trainer.spare) does them ahead
and waits; the attempt that claims it begins at building its model. ``submit`` starts one as
soon as the spec reads, so its imports overlap the pre-flight check and the lease, for the first
attempt; the supervisor starts the next once an attempt has trained ``spare_after_s()`` (30 s),
so that a restart finds one ready. A short job never pays for a spare it does not use.

Invariants:
- A spare is claimed only by an attempt whose command (interpreter, module) and environment
  (all but the heartbeat path, which the claim hands over) it was started with, and only while
  it lives; otherwise it is killed and the attempt starts cold. Claimed, it runs the trainer's
  own ``main`` with the attempt's arguments: it trains bit for bit as a cold start.
- Until claimed it writes nothing that lasts: its output goes to an unlinked temporary file,
  which it copies to the attempt's log when claimed (trainer.spare).
- It dies with its orchestrator (children.start), and one not claimed is killed when
  supervision ends (:meth:`Spare.discard`).
- At most one at a time; none under torchrun (``train.nproc`` > 1) or with
  ``run.warm_spare: false``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from timellm_job.jobs import JobSpec
from timellm_job.jobs.protocol import ENV_HEARTBEAT, TRAINER_MODULE, SpareClaim
from timellm_job.orchestrator import children

log = logging.getLogger(__name__)

SPARE_AFTER_S = 30.0  # an attempt trains this long before the next spare starts


def spare_after_s() -> float:
    """``TIMELLM_JOB_SPARE_AFTER_S`` or 30 s: how long an attempt trains before a spare starts."""
    return float(os.environ.get("TIMELLM_JOB_SPARE_AFTER_S", SPARE_AFTER_S))


def spare_argv(spec: JobSpec) -> list[str] | None:
    """The command of a spare for ``spec``'s trainer; None when the job has none."""
    if not spec.run.warm_spare or spec.train.nproc > 1:
        return None
    argv = [sys.executable, "-m", TRAINER_MODULE, "spare", "--deterministic", str(spec.train.deterministic).lower()]
    backbone = spec.model.backbone
    if spec.model.ablation == "none":  # an LLM-free variant builds no backbone
        argv += ["--preload", backbone.random.family if backbone.random is not None else backbone.pretrained]
    return argv


def start_spare(argv: list[str], env: dict[str, str]) -> Spare | None:
    """A spare started now; None (said once, as a warning) when no process can be started."""
    try:
        return Spare(argv, env)
    except OSError as exc:  # no memory for a process, no temporary folder: the attempt starts cold
        log.warning(f"warning: could not start a warm spare ({exc}); the next attempt starts cold")
        return None


class Spare:
    """One spare trainer process, started now."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked; closed when claimed or discarded
        self.proc = children.start(argv, self.output, env, stdin=subprocess.PIPE)
        self.started_at = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def claim(self, argv: list[str], env: dict[str, str], log_path) -> subprocess.Popen | None:
        """Make this spare the trainer ``argv`` (``python -m TRAINER_MODULE run ...``) with
        ``env``, writing to ``log_path``; None (and the spare is killed) when it cannot be."""
        head = 3  # python -m TRAINER_MODULE
        rest = {k: v for k, v in env.items() if k != ENV_HEARTBEAT}
        if argv[:head] != self.argv[:head] or rest != self.env or not self.alive():
            self.discard()
            return None
        claim = SpareClaim(argv=argv[head:], env={ENV_HEARTBEAT: env[ENV_HEARTBEAT]} if ENV_HEARTBEAT in env else {},
                           log=str(log_path))
        try:
            self.proc.stdin.write(claim.line())
            self.proc.stdin.close()
        except OSError:  # it died just now
            self.discard()
            return None
        self.output.close()
        return self.proc

    def discard(self) -> None:
        """Kill the spare (it has written nothing that lasts) and wait for it."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.output):
            try:
                f.close()
            except OSError:
                pass
