"""The status document (``state.json``): what ``status`` shows, from any machine.

Invariants:
- The orchestrator holding the job's lease is its only writer; the trainer reports through its
  heartbeat document and its checkpoints, which the orchestrator folds in.
- ``phase`` follows the job lifecycle::

      pending --> running --(trainer died)--> restarting --> running ...
         |           |--(SIGTERM/SIGINT)--> preempted --(submit)--> running
         |           |--(exit 0)----------> completed            (terminal)
         |           `--(bad input, budget spent, crash loop)--> failed --(submit)--> running

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

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
