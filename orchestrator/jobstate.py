"""The orchestrator's view of a job, written to ``state.json`` (the one writer: the lease holder).

Invariants:
- ``flush`` folds in the current attempt's heartbeat and the committed checkpoints, then
  replaces ``state.json`` atomically through storage.
- Only the lease holder writes: with a lease set, every flush first checks its fence and raises
  LeaseLost instead of writing once a newer generation holds the job.
- Ended attempts are never rewritten; the document is reloaded from storage at start, so a
  resubmitted job keeps its history, and its memory plan (``memory_plan``: the newest attempt's),
  which the next attempt reuses on the same card (``memory_hint``).
- The document is derived: one that cannot be read (torn, written by hand or by another version)
  is rebuilt from what storage holds (checkpoints, results, the attempts that left logs or
  metrics, so a new attempt never takes an old one's number), marked ``rebuilt`` with why; the
  writer keeps the unreadable bytes under ``set-apart/`` before replacing them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from timellm_job.jobs import Attempt, JobStatus, Phase
from timellm_job.jobs.messages import first_line
from timellm_job.jobs.protocol import Heartbeat
from timellm_job.jobs.status import Best, CheckpointInfo, CheckpointRef, LeaseInfo, goodput
from timellm_job.storage import Store, list_checkpoints
from timellm_job.storage.checkpoints import Listing
from timellm_job.storage.documents import read_json, write_json
from timellm_job.storage.layout import RESULTS, SET_APART, STATE
from timellm_job.storage.lease import Fence, Lease
from timellm_job.storage.log_segments import log_attempts
from timellm_job.storage.metrics_log import metrics_attempts
from timellm_job.storage.retention import rank_bests


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def load_status(job: Store, name: str) -> JobStatus:
    """The job's status document, or one rebuilt from storage when it cannot be read."""
    return read_status(job, name)[0]


def read_status(job: Store, name: str) -> tuple[JobStatus, str | None]:
    """The status document and, when it could not be read (and was rebuilt), why."""
    try:
        doc = read_json(job, STATE)
        return (JobStatus.model_validate(doc) if doc else JobStatus(name=name)), None
    except ValueError as exc:  # not JSON, or not a status document (pydantic's errors are ValueErrors)
        why = f"state.json could not be read ({first_line(exc, 200)})"
        return rebuild_status(job, name, why), why


def rebuild_status(job: Store, name: str, why: str) -> JobStatus:
    """What storage alone tells of a job: its progress from the newest checkpoint, its results,
    and a closed attempt for each attempt number that left a log or metrics."""
    status = JobStatus(name=name, rebuilt=f"{why}; rebuilt from storage")
    committed = list_checkpoints(job).committed
    if committed:
        newest = committed[0]
        status.global_step = newest.step
        status.epoch = int(newest.metadata.get("epoch") or 0)
    numbers = sorted(set(log_attempts(job)) | set(metrics_attempts(job)))
    for n in range(1, (numbers[-1] if numbers else 0) + 1):
        status.attempts.append(Attempt(number=n, started_at=0.0, ended_at=0.0,
                                       reason="unknown: its record was in the state.json that could not be read"))
    fold_results(status, job)
    if status.metrics:
        status.phase = Phase.COMPLETED
    return status


def checkpoint_infos(job: Store, spec_hash: str | frozenset[str] | None = None,
                     listing: Listing | None = None) -> tuple[list[CheckpointInfo], Best | None]:
    """The job's checkpoints (of ``spec_hash``, or in ``listing``) and its best, as the status shows them."""
    committed = (listing or list_checkpoints(job, spec_hash=spec_hash)).committed
    infos = [CheckpointInfo(id=m.id, step=m.step, kind=m.kind, bytes=m.bytes, created_at=m.created_at)
             for m in committed]
    ranked = rank_bests([m for m in committed if m.kind == "best"])  # the lowest validation loss
    best = None
    if ranked:
        m = ranked[0]
        best = Best(step=m.step, val_loss=m.val_loss if m.val_loss is not None else float("nan"), checkpoint=m.id)
    return infos, best


def fold_results(status: JobStatus, job: Store) -> None:
    """The test metrics of a completed job, from its ``results.json`` (with the checkpoint they
    were measured on, so they are never shown beside another)."""
    try:
        results = read_json(job, RESULTS)
    except ValueError:
        return
    if isinstance(results, dict) and results:
        status.metrics = {"test": results.get("test"), "val_loss": results.get("val_loss"),
                          "best_step": results.get("best_step"), "checkpoint": results.get("best_checkpoint")}


class JobState:
    def __init__(self, job: Store, name: str, spec_hash: str | frozenset[str] | None = None):
        self.job, self.spec_hash = job, spec_hash  # the job's hashes (orchestrator.identity)
        self.status, self.unreadable = read_status(job, name)
        self.last_flush = 0.0
        self.fence: Fence | None = None  # set with the lease: a fenced writer never writes state.json
        # told of every phase change and every attempt's start (orchestrator.notify); never raises
        self.on_change: Callable[[JobStatus], None] | None = None

    @property
    def attempt(self) -> Attempt | None:
        return self.status.attempts[-1] if self.status.attempts else None

    def keep_unreadable(self) -> str | None:
        """Under the lease, before the rebuilt document replaces an unreadable one: its bytes go
        under set-apart/ (returns where; None when there was nothing to keep)."""
        if not self.unreadable:
            return None
        try:
            data = self.job.read_bytes(STATE)
        except FileNotFoundError:
            return None
        where = f"{SET_APART}/state.json.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        self.job.replace(where, data)
        return where

    def record_identity(self, spec_hash: str, data_sha256: str | None) -> None:
        """What the job is: its spec hash and its data's content (kept once known)."""
        self.status.spec_hash = spec_hash
        self.status.data_sha256 = data_sha256 or self.status.data_sha256

    def set_lease(self, lease: Lease | None) -> None:
        self.status.lease = LeaseInfo(owner=lease.owner, host=lease.host, pid=lease.pid,
                                      expires_at=lease.expires_at, generation=lease.generation) if lease else None
        self.fence = Fence.of(self.job, lease) if lease else None

    def begin_attempt(self, pid: int, host: str, started_at: float) -> Attempt:
        number = len(self.status.attempts) + 1
        attempt = Attempt(number=number, started_at=started_at, pid=pid, host=host)
        self.status.attempts.append(attempt)
        self.status.phase = Phase.RUNNING
        self.status.reason = None
        self._changed()
        return attempt

    def fold_heartbeat(self, beat: Heartbeat | None) -> None:
        if beat is None:
            return
        s, a = self.status, self.attempt
        s.heartbeat = beat
        s.global_step = int(beat.step if beat.step is not None else s.global_step)
        s.epoch = int(beat.epoch if beat.epoch is not None else s.epoch)
        s.total_steps = beat.total_steps if beat.total_steps is not None else s.total_steps
        if a is not None and a.ended_at is None:
            if beat.resume_known:
                a.start_step = beat.start_step
                rf = beat.resumed_from
                a.resumed_from = CheckpointRef(**rf) if rf else None
                a.skipped_checkpoints = list(beat.skipped or [])
                a.resume_exactness = beat.resume_exactness
            a.end_step = s.global_step
            if beat.backbone_source:
                a.backbone_source = beat.backbone_source
            if beat.memory_plan:
                a.memory_plan = {**beat.memory_plan, "peak_bytes": beat.peak_bytes}
                s.memory_plan = a.memory_plan
            if beat.oom:
                a.oom = beat.oom
            first_step = (beat.startup or {}).get("first_step")
            if first_step:
                a.first_step_at = float(first_step)
            for key in ("training_s", "eval_s"):
                if getattr(beat, key) is not None:
                    setattr(a, key, float(getattr(beat, key)))

    def memory_hint(self) -> dict[str, Any] | None:
        """For the next attempt: the plan in force (reused on the same card), with the last
        attempt's out-of-memory diagnosis when it ran out (the next plan starts below it)."""
        plan = dict(self.status.memory_plan) if self.status.memory_plan else None
        last = self.attempt
        if last is not None and last.oom:
            plan = {**(plan or {}), "card": last.oom.get("card"), "total_bytes": last.oom.get("total_bytes"),
                    "oom": last.oom}
        return plan

    def close_lost(self, previous: Lease | None, now: float | None = None) -> Attempt | None:
        """Close the attempt a vanished orchestrator left open, as ``lost``, with what is known
        (its last heartbeat and step, its host, the lease it let expire). Returns it, if any."""
        a = self.attempt
        if a is None or a.ended_at is not None:
            return None
        now = time.time() if now is None else now
        beat = self.status.heartbeat.time if self.status.heartbeat else None
        held = f"pid {previous.pid} on {previous.host}" if previous else f"on {a.host}"
        expired = f"lease expired at {_clock(previous.expires_at)}" if previous and previous.expires_at <= now else \
            "its process is gone" if previous else "no lease left"
        a.ended_at = beat or now
        a.reason = (f"lost: orchestrator gone ({held}); last heartbeat "
                    f"{_clock(beat) if beat else 'never'} at step {a.end_step if a.end_step is not None else '?'}; "
                    f"{expired}")
        return a

    def end_attempt(self, exit_code: int | None, signal_name: str | None, reason: str) -> None:
        a = self.attempt
        if a is not None and a.ended_at is None:
            a.ended_at, a.exit_code, a.signal, a.reason = time.time(), exit_code, signal_name, reason

    def set_phase(self, phase: Phase, reason: str | None = None) -> None:
        changed = phase is not self.status.phase
        self.status.phase, self.status.reason = phase, reason
        if changed:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.status)

    def flush(self, force: bool = True, every_s: float = 5.0) -> None:
        now = time.time()
        if not force and now - self.last_flush < every_s:
            return
        self.last_flush = now
        s = self.status
        s.checkpoints, best = checkpoint_infos(self.job, self.spec_hash)
        s.best = best or s.best
        fold_results(s, self.job)
        s.heartbeat_age_s = (now - s.heartbeat.time) if s.heartbeat and s.heartbeat.time is not None else None
        s.updated_at = now
        goodput(s, now)
        if self.fence is not None:
            self.fence.check()  # LeaseLost: the newer holder's state.json is left as it is
        write_json(self.job, STATE, s.to_json_dict())
