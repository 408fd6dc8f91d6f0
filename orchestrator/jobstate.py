"""The orchestrator's view of a job, written to ``state.json`` (the one writer: the lease holder).

Invariants:
- ``flush`` folds in the current attempt's heartbeat and the committed checkpoints, then
  replaces ``state.json`` atomically through storage.
- Only the lease holder writes: with a lease set, every flush first checks its fence and raises
  LeaseLost instead of writing once a newer generation holds the job.
- Ended attempts are never rewritten; the document is reloaded from storage at start, so a
  resubmitted job keeps its history, and its memory plan (``memory_plan``: the newest attempt's),
  which the next attempt reuses on the same card (``memory_hint``).
"""

from __future__ import annotations

import time
from typing import Any

from jobs import Attempt, JobStatus, Phase
from jobs.status import Best, CheckpointInfo, CheckpointRef, LeaseInfo, goodput
from storage import Store, list_checkpoints
from storage.checkpoints import Listing
from storage.documents import read_json, write_json
from storage.layout import RESULTS, STATE
from storage.lease import Fence, Lease


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def load_status(job: Store, name: str) -> JobStatus:
    doc = read_json(job, STATE)
    return JobStatus.model_validate(doc) if doc else JobStatus(name=name)


def checkpoint_infos(job: Store, spec_hash: str | frozenset[str] | None = None,
                     listing: Listing | None = None) -> tuple[list[CheckpointInfo], Best | None]:
    """The job's checkpoints (of ``spec_hash``, or in ``listing``) and its best, as the status shows them."""
    infos, best = [], None
    for m in (listing or list_checkpoints(job, spec_hash=spec_hash)).committed:
        infos.append(CheckpointInfo(id=m.id, step=m.step, kind=m.kind, bytes=m.bytes, created_at=m.created_at))
        if m.kind == "best" and best is None:
            loss = m.metadata.get("val_loss", m.metadata.get("best_val"))
            best = Best(step=m.step, val_loss=float(loss) if loss is not None else float("nan"), checkpoint=m.id)
    return infos, best


def fold_results(status: JobStatus, job: Store) -> None:
    """The test metrics of a completed job, from its ``results.json``."""
    results = read_json(job, RESULTS)
    if results:
        status.metrics = {"test": results.get("test"), "val_loss": results.get("val_loss"),
                          "best_step": results.get("best_step")}


class JobState:
    def __init__(self, job: Store, name: str, spec_hash: str | frozenset[str] | None = None):
        self.job, self.spec_hash = job, spec_hash  # the job's hashes (orchestrator.identity)
        self.status = load_status(job, name)
        self.last_flush = 0.0
        self.fence: Fence | None = None  # set with the lease: a fenced writer never writes state.json

    @property
    def attempt(self) -> Attempt | None:
        return self.status.attempts[-1] if self.status.attempts else None

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
        return attempt

    def fold_heartbeat(self, beat: dict[str, Any] | None) -> None:
        if not beat:
            return
        s, a = self.status, self.attempt
        s.heartbeat = beat
        s.global_step = int(beat.get("step", s.global_step) or 0)
        s.epoch = int(beat.get("epoch", s.epoch) or 0)
        s.total_steps = beat.get("total_steps", s.total_steps)
        if a is not None and a.ended_at is None:
            if "start_step" in beat:
                a.start_step = beat["start_step"]
            if "resumed_from" in beat:
                rf = beat.get("resumed_from")
                a.resumed_from = CheckpointRef(**rf) if rf else None
                a.skipped_checkpoints = list(beat.get("skipped") or [])
            a.end_step = s.global_step
            if beat.get("backbone_source"):
                a.backbone_source = beat["backbone_source"]
            if beat.get("memory_plan"):
                a.memory_plan = {**beat["memory_plan"], "peak_bytes": beat.get("peak_bytes")}
                s.memory_plan = a.memory_plan
            if beat.get("oom"):
                a.oom = beat["oom"]
            first_step = (beat.get("startup") or {}).get("first_step")
            if first_step:
                a.first_step_at = float(first_step)
            for key in ("training_s", "eval_s"):
                if beat.get(key) is not None:
                    setattr(a, key, float(beat[key]))

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
        beat = (self.status.heartbeat or {}).get("time")
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
        self.status.phase, self.status.reason = phase, reason

    def flush(self, force: bool = True, every_s: float = 5.0) -> None:
        now = time.time()
        if not force and now - self.last_flush < every_s:
            return
        self.last_flush = now
        s = self.status
        s.checkpoints, best = checkpoint_infos(self.job, self.spec_hash)
        s.best = best or s.best
        fold_results(s, self.job)
        s.heartbeat_age_s = (now - s.heartbeat["time"]) if s.heartbeat and "time" in s.heartbeat else None
        s.updated_at = now
        goodput(s, now)
        if self.fence is not None:
            self.fence.check()  # LeaseLost: the newer holder's state.json is left as it is
        write_json(self.job, STATE, s.to_json_dict())
