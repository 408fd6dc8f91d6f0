"""The status document (``state.json``): what ``status`` shows, from any machine.

Invariants:
- The orchestrator holding the job's lease is its only writer; the trainer reports through its
  heartbeat document and its checkpoints, which the orchestrator folds in.
- ``phase`` follows the job lifecycle, the one diagram of it (orchestrator.policy decides each
  transition after an attempt; jobs.protocol.ExitCode names the codes)::

      pending --submit--> running
      running --trainer exit 0--------------------------------------------> completed (exit 0)
      running --exit 2: bad input-----------------------------------------> failed    (exit 2)
      running --exit 4: out of memory, no smaller plan (or not auto)------> failed    (exit 1)
      running --exit 4, a smaller plan (micro_batch_size auto)--+
      running --killed / crashed / hung / exit 3 (lease still ours)--+--> restarting --backoff--> running
                 `-- the restart budget spent, or a crash loop ------------> failed    (exit 1)
      running --SIGTERM/SIGINT/stop: forward, grace, kill-----------------> preempted (exit 143/130)
      running --our lease taken over (renewal, flush, trainer exit 3)---> (stop the trainer, write
                                                                            nothing: exit 3)
      running --the orchestrator vanished (runtime gone)------------------> interrupted
      preempted | failed | interrupted --submit--> running;   completed --submit--> (nothing to do)

  ``interrupted`` is never written: the document says ``running`` (or ``restarting``) and its
  lease expired (or its holder's pid is dead on this host); readers report it as
  ``interrupted`` (:func:`effective_phase`), and the next ``submit`` closes the attempt that
  never ended as ``lost: ...``.

- ``attempts`` only grows; an attempt is never rewritten once it has ended.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from timellm_job.jobs.protocol import Heartbeat


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
    # how the resume continues the run: "bit for bit", or "up to float order (what differs:
    # the card, a version, deterministic kernels off)"; None from the start
    resume_exactness: str | None = None
    backbone_source: str | None = None
    memory_plan: dict[str, Any] | None = None  # the plan the trainer made (trainer.memory), with peak_bytes
    oom: dict[str, Any] | None = None  # the trainer's out-of-memory diagnosis, when it ran out
    first_step_at: float | None = None  # when its first optimizer step ended (start-up before it)
    warm_spare: bool = False  # its trainer was a warm spare (orchestrator.spare): imports done before it began
    training_s: float | None = None  # time in training steps, as the trainer measured it
    eval_s: float | None = None  # time validating and testing, as the trainer measured it
    goodput: dict[str, Any] | None = None  # where its wall time went (see goodput())


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
    heartbeat: Heartbeat | None = None  # the current attempt's last, as the orchestrator read it
    heartbeat_age_s: float | None = None
    lease: LeaseInfo | None = None
    metrics: dict[str, Any] | None = None
    updated_at: float | None = None
    spec_hash: str | None = None  # the job's identity: its training fields and its data's content
    data_sha256: str | None = None  # what the data file held when the job trained (storage.data_digest)
    rebuilt: str | None = None  # why this document was rebuilt from storage (an unreadable state.json)
    memory_plan: dict[str, Any] | None = None  # the plan in force: the newest attempt's
    preemption_notice: dict[str, Any] | None = None  # the watcher: provider, url, problem (None: working)
    unsafe_single_writer: str | None = None  # why the store runs without create-only writes (None: it has them)
    goodput: dict[str, Any] | None = None  # where the job's wall time went (see goodput())

    @field_validator("heartbeat", mode="before")
    @classmethod
    def _heartbeat(cls, value: Any) -> Heartbeat | None:  # one another version wrote badly: none
        return value if isinstance(value, Heartbeat) else Heartbeat.parse(value)

    @field_serializer("heartbeat")
    def _heartbeat_doc(self, beat: Heartbeat | None) -> dict[str, Any] | None:
        return beat.to_doc() if beat is not None else None

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


def _parts(wall: float, startup: float, training: float, retrained: float, evaluating: float) -> dict[str, Any]:
    idle = max(0.0, wall - startup - training - retrained - evaluating)
    parts = {"startup_s": startup, "training_s": training, "retrained_s": retrained, "eval_s": evaluating,
             "idle_s": idle}
    parts = {k: round(v, 3) for k, v in parts.items()}
    wall = round(sum(parts.values()), 3)  # the parts add up to the wall time by construction
    return {"wall_s": wall, "useful_s": parts["training_s"],
            "share": round(parts["training_s"] / wall, 4) if wall > 0 else None, "parts": parts}


def attempt_goodput(a: Attempt, done_before: int, now: float) -> dict[str, Any]:
    """One attempt's wall time (start to end, or ``now``) split into: start-up (process start to
    its first optimizer step: imports, backbone, checkpoint read), training that counted, steps
    retrained (those an earlier attempt had reached already: ``done_before``), validation and
    testing, and the rest (idle: a checkpoint write at exit, waiting on storage, shutdown)."""
    end = a.ended_at if a.ended_at is not None else now
    wall = max(0.0, end - a.started_at)
    startup = min(wall, max(0.0, a.first_step_at - a.started_at)) if a.first_step_at else wall
    trained = min(max(0.0, a.training_s or 0.0), wall - startup)
    evaluating = min(max(0.0, a.eval_s or 0.0), wall - startup - trained)
    steps = max(0, (a.end_step or 0) - (a.start_step or 0))
    again = min(steps, max(0, done_before - (a.start_step or 0)))
    retrained = trained * again / steps if steps else 0.0
    return _parts(wall, startup, trained - retrained, retrained, evaluating)


def goodput(status: JobStatus, now: float) -> None:
    """Fill ``goodput`` for the job and each attempt. The job's wall time runs from its first
    attempt's start to its last's end (or ``now``); time between attempts (backoff, a dead
    runtime before the next submit) is idle. ``useful_s`` is the training that counted and
    ``share`` its part of the wall time."""
    if not status.attempts:
        status.goodput = None
        return
    reached = 0
    totals = {"startup_s": 0.0, "training_s": 0.0, "retrained_s": 0.0, "eval_s": 0.0}
    for a in status.attempts:
        a.goodput = attempt_goodput(a, reached, now)
        for key in totals:
            totals[key] += a.goodput["parts"][key]
        reached = max(reached, a.end_step or 0)
    first, last = status.attempts[0], status.attempts[-1]
    end = last.ended_at if last.ended_at is not None else now
    wall = max(0.0, end - first.started_at, sum(totals.values()))
    status.goodput = _parts(wall, totals["startup_s"], totals["training_s"], totals["retrained_s"], totals["eval_s"])
