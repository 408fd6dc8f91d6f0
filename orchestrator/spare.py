"""Warm spares: trainer processes that do their imports before their attempt begins.

Most of a trainer's start-up is imports (torch, the loop, transformers' model classes): on 2
cores the tiny job's restarted trainer took 3.7 s to its first step cold, 0.2 s from a spare
(benchmarks/startup_bench.py). A spare (trainer.spare) does them ahead and waits; the attempt
that claims it begins at building its model. ``submit`` starts one as soon as the spec reads,
so its imports overlap the pre-flight check and the lease, for the first attempt; the
supervisor starts the next once an attempt has trained ``spare_after_s()`` (2 minutes), so that a
restart finds one ready: an attempt shorter than that pays for no spare it does not use.

Invariants:
- A spare is claimed only by an attempt whose command (interpreter, module) and environment
  (all but the heartbeat path, which the claim hands over) it was started with, and only while
  it lives; otherwise it is killed and the attempt starts cold. Claimed, it runs the trainer's
  own ``main`` with the attempt's arguments: it trains bit for bit as a cold start.
- Until claimed it writes nothing that lasts: its output goes to an unlinked temporary file,
  which it copies to the attempt's log when claimed (trainer.spare).
- It dies with its orchestrator (children.start), and one not claimed is killed when the
  submit ends (:class:`Spares`, which owns it from submit's start to its end).
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

from timellm_job.jobs import JobSpec
from timellm_job.jobs.protocol import ENV_HEARTBEAT, TRAINER_MODULE, SpareClaim
from timellm_job.orchestrator import children
from timellm_job.orchestrator.threads import thread_env

log = logging.getLogger(__name__)

# an attempt trains this long before the next spare starts: an attempt that dies sooner is more
# likely a job that cannot start (a crash loop) than a preemption, and a short job pays for none
SPARE_AFTER_S = 120.0


def spare_after_s() -> float:
    """``TIMELLM_JOB_SPARE_AFTER_S`` or 120 s: how long an attempt trains before a spare starts."""
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


class Spare:
    """One spare trainer process, started now."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.argv, self.env = argv, env
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked; closed when claimed or discarded
        self.proc = children.start(argv, self.output, env, stdin=subprocess.PIPE)

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


class Spares:
    """A submit's warm spare, from its start to its end: started when due, taken by the next
    attempt, killed when the submit ends. After ``DEATHS`` spares died unclaimed (or one could
    not be started) it starts no more: attempts start cold."""

    DEATHS = 3

    def __init__(self):
        self.argv: list[str] | None = None  # none until a spec says what a spare is
        self.nproc = 1
        self.spare: Spare | None = None
        self.deaths = 0

    def configure(self, spec: JobSpec) -> Spares:
        self.argv, self.nproc = spare_argv(spec), spec.train.nproc
        return self

    def start(self) -> None:
        """One now, unless the job has none or one waits already."""
        if self.argv is None or self.spare is not None or self.deaths >= self.DEATHS:
            return
        try:
            self.spare = Spare(self.argv, children.attempt_env(thread_env(self.nproc)))
        except OSError as exc:  # no memory for a process, no temporary folder: attempts start cold
            log.warning(f"warning: could not start a warm spare ({exc}); attempts start cold")
            self.deaths = self.DEATHS

    def take(self) -> Spare | None:
        """The spare, for the attempt starting now (it claims it, or kills it)."""
        spare, self.spare = self.spare, None
        return spare

    def watch(self, trained_s: float | None, stopping: bool) -> None:
        """While an attempt runs (each tick): replace a spare that died; start one once the
        attempt has trained ``spare_after_s()`` (``trained_s``: since it started, once it has
        taken a step; None before). None while stopping."""
        if self.spare is not None and not self.spare.alive():
            if not stopping:  # stopping, every process may get the signal: not worth a word
                self.deaths += 1
                log.warning(f"warning: the warm spare (pid {self.spare.pid}) died unclaimed (exit "
                            f"{self.spare.proc.returncode})"
                            + ("; starting no more: restarts start cold" if self.deaths >= self.DEATHS else ""))
            self.discard()
        if not stopping and trained_s is not None and trained_s >= spare_after_s():
            self.start()

    def discard(self) -> None:
        if self.spare is not None:
            self.spare.discard()
            self.spare = None
