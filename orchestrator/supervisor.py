"""The supervisor: one loop that maps what it observes to one action.

The job's lifecycle is drawn once, in jobs.status; what follows an attempt's end is
orchestrator.policy's ``decide`` (pure, table-tested), from orchestrator.outcome's ``classify``
of what was observed. This loop observes, calls them, and acts: start an attempt, watch it,
back off, or end with the decision's phase and exit code. A lease taken over by another
orchestrator (seen at a renewal, a flush of state.json, or the trainer's exit 3 when its commit
found itself fenced) ends it at once, writing nothing more: exit 3.

Each tick (at most ``TICK_S``, and at once when the trainer exits or a signal arrives):
renew the lease when due, fold the heartbeat into the state, kill a trainer whose heartbeat is
older than ``run.heartbeat_timeout_s``, flush ``state.json`` now and then (at once when an
attempt's resume point and skipped checkpoints are first known), and look for a stop request
(``timellm-job stop`` from any machine writes ``stop.json``) every ``STOP_POLL_S``: it is taken
as SIGTERM (with ``now``, as a second signal), and removed. A stop file that cannot be read (torn,
written by hand) is still a stop request: it is taken as SIGTERM, with a warning.

No exception in a tick ends supervision: a tick that fails (a store that answers nothing, a full
disk under state.json) is reported once and the trainer runs on, watched as before; the next
tick tries again. An error outside the ticks stops the trainer as on SIGTERM (it commits a
preempt checkpoint), closes its attempt with the error as its reason, and the job fails (exit 1).

A warm spare (orchestrator.spare.Spares) is kept for the next attempt once the running one has
trained ``spare_after_s()``: a restart claims it and skips the trainer's imports.

The restart budget (``run.max_restarts``) counts the restarts of this submit: a job
resubmitted after a week gets its budget again; preemptions and vanished runtimes end a submit
and never count.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from timellm_job.jobs import JobSpec, Phase
from timellm_job.jobs.messages import first_line
from timellm_job.jobs.protocol import ExitCode, Heartbeat
from timellm_job.jobs.status import describe_plan
from timellm_job.orchestrator.attempt import TrainerProcess
from timellm_job.orchestrator.jobstate import JobState
from timellm_job.orchestrator.outcome import ExitClass, Outcome, Stopping, classify
from timellm_job.orchestrator.policy import End, History, Restart, decide, stopped
from timellm_job.orchestrator.spare import Spares
from timellm_job.orchestrator.threads import thread_env
from timellm_job.storage import StorageError, Store, list_checkpoints
from timellm_job.storage import lease as leases
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import STOP
from timellm_job.storage.log_segments import LogUploader

log = logging.getLogger(__name__)

TICK_S = 1.0
STOP_POLL_S = 3.0
LOG_UPLOAD_S = 10.0  # what the trainer's log gained is copied to the job folder this often


class StopRequest:
    """A stop under way (our SIGTERM/SIGINT, a stop request, a preemption notice): the signal
    forwarded, when the grace period ends, and how it ended if we had to kill."""

    def __init__(self, signum: int, grace_period_s: float):
        self.signum, self.grace_period_s = signum, grace_period_s
        self.deadline = time.time() + grace_period_s
        self.forced = False  # a second signal killed the trainer at once
        self.grace_over = False  # the grace period ran out and the trainer was killed

    def stopping(self) -> Stopping:
        return Stopping(self.signum, self.forced, self.grace_over, self.grace_period_s)


class Supervisor:
    def __init__(self, spec: JobSpec, job: Store, state: JobState, lease: leases.Lease, lease_ttl_s: float,
                 trainer_argv: Callable[[int, dict | None], list[str]], workdir: Path,
                 on_progress: Callable[[dict | None], None] = lambda beat: None, spares: Spares | None = None):
        """``spares``: the submit's warm spares (one may wait already, for the first attempt)."""
        self.spec, self.job, self.state, self.lease = spec, job, state, lease
        self.lease_ttl_s, self.renew_every = lease_ttl_s, lease_ttl_s / 3
        self.trainer_argv, self.workdir, self.on_progress = trainer_argv, workdir, on_progress
        self.wake = threading.Event()
        self.stop: StopRequest | None = None
        self.lease_renewed = time.monotonic()  # renewals are timed on this machine's monotonic clock
        self.renew_failing = False
        self.proc: TrainerProcess | None = None
        self.log_uploaded = 0.0
        self.log_uploader: LogUploader | None = None
        self.plan_said = 0  # the attempt whose memory plan was printed
        self.resume_recorded = 0  # the attempt whose resume point (and skipped checkpoints) state.json holds
        self.stop_polled = time.time()
        self.tick_failing: str | None = None  # the error the last tick failed with (said once)
        self.spares = (spares or Spares()).configure(spec)

    # ------------------------------------------------------------------ signals
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM
        if self.stop is not None:
            if self.proc is not None:  # a second signal: no more grace
                self.stop.forced = True
                self.proc.signal_group(signal.SIGKILL)
        else:
            self.stop = StopRequest(signum, self.spec.run.grace_period_s)
            if self.proc is not None:
                self.proc.signal_group(signum)
        self.wake.set()

    def _stop_requested(self) -> None:
        """A stop request in the job folder: the same path as our own SIGTERM (twice with now)."""
        if time.time() - self.stop_polled < STOP_POLL_S:
            return
        self.stop_polled = time.time()
        try:
            request = read_json(self.job, STOP)
        except ValueError as exc:  # torn or written by hand: still somebody asking to stop
            log.warning(f"warning: the stop request cannot be read ({exc}); stopping as asked")
            request = {}
        if request is None:
            return
        if not isinstance(request, dict):
            request = {}
        self.job.remove(STOP)
        log.info(f"stop requested from {request.get('host', '?')} (pid {request.get('pid', '?')})"
                 + (": at once" if request.get("now") else ""))
        self._on_signal(signal.SIGTERM, None)
        if request.get("now"):
            self._on_signal(signal.SIGTERM, None)

    def request_preemption(self, why: str) -> None:
        """A preemption notice (metadata watcher): the same path as our own SIGTERM."""
        log.info(f"preemption notice: {why}")
        os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------------ one attempt
    def _start(self) -> TrainerProcess:
        attempt = len(self.state.status.attempts) + 1
        hint = self.state.memory_hint()
        proc = TrainerProcess(self.trainer_argv(attempt, hint), self.workdir, attempt, env=thread_env(self.spec.train.nproc),
                              launcher=self.spec.train.nproc > 1, spare=self.spares.take())
        self.proc = proc
        self.state.begin_attempt(proc.pid, socket.gethostname(), proc.started_at).warm_spare = proc.warm
        self.state.flush()
        log.info(f"attempt {attempt}: trainer pid {proc.pid} started{' (a warm spare)' if proc.warm else ''} "
                 f"(log: {proc.log_path})")
        threading.Thread(target=lambda: (proc.exited.wait(), self.wake.set()), daemon=True).start()
        if self.stop is not None:  # a signal arrived while starting
            proc.signal_group(self.stop.signum)
        return proc

    def _keep_spare(self, proc: TrainerProcess, beat: Heartbeat | None) -> None:
        trained = beat is not None and beat.step is not None and beat.start_step is not None \
            and beat.step > beat.start_step
        self.spares.watch(time.time() - proc.started_at if trained else None, self.stop is not None)

    def _upload_log(self, proc: TrainerProcess) -> None:
        if self.log_uploader is None or self.log_uploader.attempt != proc.attempt:
            self.log_uploader = LogUploader(self.job, proc.attempt)
        try:
            self.log_uploader.upload(proc.log_path)
        except OSError as exc:
            log.warning(f"warning: could not copy the trainer log: {exc}")

    def _renew_lease_if_due(self) -> None:
        now = time.monotonic()
        if now - self.lease_renewed >= self.renew_every:
            try:
                self.lease = leases.renew(self.job, self.lease, self.lease_ttl_s)
            except StorageError as exc:  # a stalled store: try again next tick; if the lease lapses
                # meanwhile and another runtime takes it, the next renewal (and every commit) is fenced
                if not self.renew_failing:
                    log.warning(f"warning: could not renew the lease (trying again every tick): {exc}")
                self.renew_failing = True
                return
            if self.renew_failing:
                log.info("the lease is renewed again")
            self.renew_failing = False
            self.state.set_lease(self.lease)
            self.lease_renewed = now

    def _backoff(self, delay: float) -> None:
        """Wait between attempts, still renewing the lease; a signal ends the wait at once."""
        until = time.time() + delay
        while self.stop is None and (left := until - time.time()) > 0:
            self.wake.wait(min(TICK_S, left))
            self.wake.clear()
            self._safe_tick(None)

    def _tick(self, proc: TrainerProcess) -> float | None:
        """Housekeeping while the trainer runs; returns the hang duration when it hung."""
        now = time.time()
        self._renew_lease_if_due()
        beat = self._fold(proc)
        self._stop_requested()
        self._keep_spare(proc, beat)
        if self.stop is not None and now >= self.stop.deadline:
            self.stop.grace_over = True
            proc.signal_group(signal.SIGKILL)
            return None
        age = proc.heartbeat_age()
        if self.stop is None and age > self.spec.run.heartbeat_timeout_s:
            log.info(f"attempt {proc.attempt}: no heartbeat for {age:.0f} s: killing the trainer")
            proc.kill()
            return age
        if now - self.log_uploaded >= LOG_UPLOAD_S:
            self._upload_log(proc)
            self.log_uploaded = now
        self.state.flush(force=False)
        return None

    def _safe_tick(self, proc: TrainerProcess | None) -> float | None:
        """A tick whose failure is said once and survived (fencing excepted: that ends us);
        without a trainer (between attempts), the lease and the stop request only."""
        try:
            if proc is None:
                self._renew_lease_if_due()
                self._stop_requested()
                hung_for = None
            else:
                hung_for = self._tick(proc)
        except leases.LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            why = f"{type(exc).__name__}: {first_line(exc)}"
            if why != self.tick_failing:
                log.warning(f"warning: supervision could not do its housekeeping ({why}); "
                         "the trainer runs on, and the next tick tries again")
            self.tick_failing = why
            return None
        if self.tick_failing is not None:
            log.info("supervision's housekeeping works again")
            self.tick_failing = None
        return hung_for

    def _watch(self, proc: TrainerProcess) -> Outcome:
        hung_for = None
        while not proc.exited.is_set():
            self.wake.wait(TICK_S)
            self.wake.clear()
            if proc.exited.is_set():
                break
            hung_for = self._safe_tick(proc)
            if hung_for is not None:
                break
        proc.exited.wait()
        self._fold(proc)
        self._upload_log(proc)
        host_oom = None
        if hung_for is None and self.stop is None and proc.returncode == -signal.SIGKILL:
            host_oom = proc.oom_watch.evidence()
        return classify(proc.returncode, self.stop.stopping() if self.stop else None, hung_for, proc.log_tail(),
                        proc.heartbeat(), proc.launcher, host_oom, newest=self._newest)

    def _newest(self) -> str:
        """Where a resume will start: the job's newest committed checkpoint."""
        try:
            newest = list_checkpoints(self.job, spec_hash=self.state.spec_hash).committed
        except StorageError:
            return ""
        return f"; the newest checkpoint is {newest[0].id} (step {newest[0].step})" if newest else \
            "; no checkpoint is committed yet"

    def _fold(self, proc: TrainerProcess) -> Heartbeat | None:
        """The heartbeat into the state (and returned); the memory plan said once, when the
        trainer made it."""
        beat = proc.heartbeat()
        self.state.fold_heartbeat(beat)
        self.on_progress(beat)
        if beat and beat.resume_known and self.resume_recorded != proc.attempt:
            # where the attempt resumed and what it skipped goes on record at once, not at the next
            # periodic flush: a runtime that vanishes before then would leave it out of the attempt
            self.resume_recorded = proc.attempt
            self.state.flush()
        plan = self.state.attempt.memory_plan if self.state.attempt else None
        if plan and self.plan_said != proc.attempt:
            self.plan_said = proc.attempt
            log.info(f"attempt {proc.attempt}: memory plan: {describe_plan(plan)}")
        return beat

    # ------------------------------------------------------------------ the loop
    def _end(self, end: End) -> int:
        self.state.set_phase(end.phase, end.reason)
        self.state.flush()
        if end.phase is Phase.FAILED:
            log.info(f"failed: {end.reason}")
        return end.exit_code

    def run(self) -> int:
        """Supervise until the job ends; returns submit's exit code."""
        self.install_signals()
        try:
            return self._run()
        finally:
            self.spares.discard()

    def _run(self) -> int:
        try:
            return self._loop()
        except leases.LeaseLost as lost:  # fenced: the newer holder's state and files stay untouched
            if self.proc is not None and not self.proc.exited.is_set():
                self.proc.kill()
            log.error(f"error: {lost}; stopped the trainer, wrote nothing")
            return ExitCode.FENCED
        except Exception as exc:  # noqa: BLE001 - never leave the attempt open and the trainer orphaned
            return self._abandon(exc)

    def _abandon(self, exc: BaseException) -> int:
        """Supervision failed outside a tick: stop the trainer as on SIGTERM (a preempt checkpoint
        within the grace period), close its attempt with the error, and fail the job."""
        why = f"supervision failed: {type(exc).__name__}: {first_line(exc)}"
        proc = self.proc
        if proc is not None and not proc.exited.is_set():
            proc.signal_group(signal.SIGTERM)
            if not proc.exited.wait(self.spec.run.grace_period_s):
                proc.signal_group(signal.SIGKILL)
                proc.exited.wait(10)
        if proc is not None:
            self.state.end_attempt(proc.returncode, None, why)
        self.state.set_phase(Phase.FAILED, why)
        try:
            self.state.flush()
        except Exception as flush_exc:  # noqa: BLE001 - the store may be what failed
            log.warning(f"warning: could not record the failure in state.json: {first_line(flush_exc)}")
        log.error(f"error: {why}")
        return ExitCode.FAILED

    def _loop(self) -> int:
        history = History(self.state.status.attempts)
        run = self.spec.run
        while True:
            proc = self._start()
            outcome = self._watch(proc)
            if outcome.exit_class is ExitClass.FENCED:
                leases.check(self.job, self.lease.generation, self.lease.owner)  # raises: we are fenced too
            self.state.end_attempt(outcome.exit_code, outcome.signal, outcome.reason)
            log.info(f"attempt {proc.attempt}: {outcome.reason}")
            decision = decide(outcome, history, run, self.stop.stopping() if self.stop else None)
            if isinstance(decision, End):
                return self._end(decision)
            assert isinstance(decision, Restart)
            history = History(self.state.status.attempts, history.restarts_here + 1, decision.restarts_in_a_row)
            self.state.status.restarts += 1
            self.state.set_phase(Phase.RESTARTING, decision.reason)
            self.state.flush()
            log.info(f"restarting in {decision.delay_s:.1f} s "
                     f"(restart {history.restarts_here}/{run.max_restarts} of this submit)")
            self._backoff(decision.delay_s)
            if self.stop is not None:
                return self._end(stopped(self.stop.stopping()))
