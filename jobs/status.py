"""The status document (``state.json``): what ``status`` shows, from any machine.

Invariants:
- The orchestrator holding the job's lease is its only writer; the trainer reports through its
  heartbeat document and its checkpoints, which the orchestrator folds in.
- ``phase`` follows the job lifecycle::

      pending --> running --(trainer died)--> restarting --> running ...
         |           |--(SIGTERM/SIGINT)--> preempted --(submit)--> running
         |           |--(exit 0)----------> completed            (terminal)
         |           |--(bad input, budget spent, crash loop)--> failed --(submit)--> running
         |           `--(the orchestrator vanished: runtime gone)--> interrupted --(submit)--> running

  ``interrupted`` is never written: the document says ``running`` (or ``restarting``) and its
  lease expired (or its holder's pid is dead on this host); readers report it as
  ``interrupted`` (:func:`effective_phase`), and the next ``submit`` closes the attempt that
  never ended as ``lost: ...``.

- ``attempts`` only grows; an attempt is never rewritten once it has ended.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Phase(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    RESTARTING = "restarting"
    PREEMPTED = "preempted"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the orchestrator is gone and its lease expired


class CheckpointRef(BaseModel):
    id: str
    step: int


class Attempt(BaseModel):
    model_config = ConfigDict(extra="allow")
    number: int
    started_at: float
    ended_at: float | None = None
    pid: int | None = None
    host: str | None = None
    resumed_from: CheckpointRef | None = None
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = None
    start_step: int | None = None
    end_step: int | None = None
    skipped_checkpoints: list[str] = Field(default_factory=list)
    backbone_source: str | None = None
    memory_plan: dict[str, Any] | None = None  # the plan the trainer made (trainer.memory), with peak_bytes
    oom: dict[str, Any] | None = None  # the trainer's out-of-memory diagnosis, when it ran out


class Best(BaseModel):
    step: int
    val_loss: float
    checkpoint: str


class CheckpointInfo(BaseModel):
    id: str
    step: int
    kind: str
    bytes: int
    valid: bool | None = None
    created_at: float | None = None


class LeaseInfo(BaseModel):
    owner: str
    host: str
    pid: int
    expires_at: float
    generation: int = 0  # the lease generation: grows with every takeover


class JobStatus(BaseModel):
    """The whole document; unknown keys are kept so newer writers do not lose fields."""

    model_config = ConfigDict(extra="allow")
    name: str
    phase: Phase = Phase.PENDING
    reason: str | None = None
    epoch: int = 0
    global_step: int = 0
    total_steps: int | None = None
    restarts: int = 0
    attempts: list[Attempt] = Field(default_factory=list)
    best: Best | None = None
    checkpoints: list[CheckpointInfo] = Field(default_factory=list)
    heartbeat: dict[str, Any] | None = None
    heartbeat_age_s: float | None = None
    lease: LeaseInfo | None = None
    metrics: dict[str, Any] | None = None
    updated_at: float | None = None
    spec_hash: str | None = None
    memory_plan: dict[str, Any] | None = None  # the plan in force: the newest attempt's
    preemption_notice: dict[str, Any] | None = None  # the watcher: provider, url, problem (None: working)
    unsafe_single_writer: str | None = None  # why the store runs without create-only writes (None: it has them)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


GiB = 1024**3


def describe_plan(plan: dict[str, Any]) -> str:
    """A memory plan (``memory_plan`` of the status and its attempts) in one line for people."""
    mem = f" ({plan['total_bytes'] / GiB:.1f} GiB)" if plan.get("total_bytes") else ""
    peaks = [f"{label} {plan[key] / GiB:.2f} GiB" for key, label in (("probe_peak_bytes", "probed peak"),
                                                                     ("peak_bytes", "peak")) if plan.get(key)]
    return (f"micro-batch {plan.get('micro_batch_size')} of {plan.get('batch_per_process')}, gradient checkpointing "
            f"{'on' if plan.get('gradient_checkpointing') else 'off'}, {plan.get('compute_dtype')} on "
            f"{plan.get('card')}{mem}" + (", " + ", ".join(peaks) if peaks else "") + f" [{plan.get('how')}]"
            + (f": {plan['note']}" if plan.get("note") else ""))


def effective_phase(phase: Phase, lease_live: bool) -> Phase:
    """The phase to report: a job that says it runs while no live orchestrator holds its lease
    was interrupted (its runtime vanished without a word)."""
    if phase in (Phase.RUNNING, Phase.RESTARTING) and not lease_live:
        return Phase.INTERRUPTED
    return phase
