"""The contract between the orchestrator and its trainer subprocess, in one place both import.

Four things cross the process boundary, and only these:

- the trainer's **exit code** (:class:`ExitCode`): what it means and what the supervisor does
  with it (:data:`ON_EXIT`); ``submit`` itself ends with the same codes (0, 1, 2, 3, 130, 143);
- the **heartbeat** (:class:`Heartbeat`): a small JSON document the trainer replaces atomically
  (trainer.reporting) and the orchestrator reads through this model, never as a loose dict;
- the **environment** the orchestrator sets for the trainer (the ``ENV_*`` names);
- a warm spare's **claim** (:class:`SpareClaim`): one line on the spare's standard input that
  makes it an attempt's trainer (orchestrator.spare writes it, trainer.spare reads it).

Invariants:
- No decision parses a reason string: what the supervisor acts on is an exit code or a typed
  heartbeat field (``preempt_skipped``, ``exit_code``, ``oom``).
- A heartbeat written by another version is still read: unknown fields are kept, a document
  that is not a heartbeat at all reads as none (``Heartbeat.parse`` returns None).
- The JSON keys are the document's since the first release (the trainer's activity is stored
  as ``phase``), so ``status --json`` shows what it always showed.

The job's lifecycle (phases, and which exit leads where) is drawn once, in :mod:`jobs.status`.
"""

from __future__ import annotations

import enum
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ExitCode(enum.IntEnum):
    """Exit codes of the trainer (``python -m timellm_job.trainer``) and of ``timellm-job submit``."""

    OK = 0  # trainer: trained to the end, or the job was complete already. submit: completed
    FAILED = 1  # trainer: crashed (any unexpected error). submit: failed for good
    BAD_INPUT = 2  # the spec, the data or the backbone cannot work: the message names the field
    FENCED = 3  # trainer: a newer lease generation holds the job. submit: another orchestrator holds it
    OUT_OF_MEMORY = 4  # trainer: out of memory, diagnosed (the heartbeat's ``oom``, the log's last line)
    SIGINT = 130  # stopped by SIGINT: the step it stopped at is committed (or the heartbeat says why not)
    KILLED = 137  # SIGKILL by its own parent watch (the orchestrator vanished)
    SIGTERM = 143  # stopped by SIGTERM (a preemption, ``timellm-job stop``): as SIGINT


STOPPED = (ExitCode.SIGTERM, ExitCode.SIGINT)

#: what the supervisor does when the trainer exits with each code (see jobs.status for the diagram)
ON_EXIT: dict[ExitCode, str] = {
    ExitCode.OK: "the job is completed",
    ExitCode.FAILED: "a crash: restart from the newest verified checkpoint, within the budget",
    ExitCode.BAD_INPUT: "the job fails at once (exit 2): the same input would fail again",
    ExitCode.FENCED: "check the lease: the newer holder owns the job; stop, write nothing (exit 3)",
    ExitCode.OUT_OF_MEMORY: "restart with a smaller memory plan when train.micro_batch_size is auto "
                            "and one exists; else the job fails with the diagnosis",
    ExitCode.SIGINT: "after our own SIGINT: the job is preempted (exit 130); else a crash",
    ExitCode.KILLED: "a crash (killed): restart",
    ExitCode.SIGTERM: "after our own SIGTERM: the job is preempted (exit 143); else a crash",
}

# ----------------------------------------------------------------------------- command
#: the trainer's module: the orchestrator runs ``python -m TRAINER_MODULE run|check|import ...``,
#: and ``spare`` for a warm spare
TRAINER_MODULE = "timellm_job.trainer"


class SpareClaim(BaseModel):
    """What makes a warm spare an attempt's trainer: the arguments after ``python -m
    TRAINER_MODULE`` (``run ...``), the variables only the attempt knows (its heartbeat path),
    and the attempt's log, which becomes the spare's output. One JSON line."""

    model_config = ConfigDict(extra="forbid")
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    log: str

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"

# ----------------------------------------------------------------------------- environment
ENV_HEARTBEAT = "TIMELLM_JOB_HEARTBEAT"  # the heartbeat document's local path (rank 0 writes it)
ENV_HEARTBEAT_INTERVAL_S = "TIMELLM_JOB_HEARTBEAT_INTERVAL_S"  # the least time between beats (0.5)
ENV_PARENT_PID = "TIMELLM_JOB_PARENT_PID"  # the orchestrator's pid: the trainer exits when it is gone


class TrainerActivity(str, enum.Enum):
    """What the trainer is doing (the heartbeat's ``phase`` key): not the job's phase."""

    LOADING = "loading"
    TRAINING = "training"
    VALIDATING = "validating"
    TESTING = "testing"
    COMPLETED = "completed"
    CRASHED = "crashed"
    PREEMPTED = "preempted"
    FENCED = "fenced"


EVALUATING = (TrainerActivity.VALIDATING, TrainerActivity.TESTING)


class Heartbeat(BaseModel):
    """The trainer's heartbeat document. Every field is optional: a beat carries what changed,
    the document accumulates them. Field names are the JSON keys (but ``activity``: ``phase``)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    pid: int | None = None
    time: float | None = None  # when it was written (the writer's wall clock)
    activity: str | None = Field(None, alias="phase")  # a TrainerActivity (a newer one reads too)
    busy: str | None = None  # a long blocking call beats for it: "starting", "checkpoint write", ...
    host: str | None = None
    attempt: int | None = None
    # progress
    step: int | None = None
    epoch: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    steps_per_s: float | None = None
    skipped_steps: int | None = None  # fp16 steps the loss scaler skipped
    best_val: float | None = None
    best_step: int | None = None
    eval_batch: int | None = None  # of the evaluation running now (cleared when the activity changes)
    eval_batches: int | None = None
    download_bytes: int | None = None  # what a backbone download has reached
    # the attempt's start: set once, together, when the resume point is known
    start_step: int | None = None
    resumed_from: dict[str, Any] | None = None  # {"id", "step"} of the checkpoint, None: from the start
    skipped: list[str] | None = None  # checkpoints that did not verify (id and why)
    resume_exactness: str | None = None  # "bit for bit" or "up to float order (what differs)"
    backbone_source: str | None = None
    memory_plan: dict[str, Any] | None = None  # trainer.memory's plan in force
    peak_bytes: int | None = None  # peak GPU memory so far
    startup: dict[str, float] | None = None  # start-up marks (imported, backbone, built, resumed, first_step)
    training_s: float | None = None  # goodput clocks of this attempt
    eval_s: float | None = None
    # how it ended
    exit_code: int | None = None  # the trainer's own (torchrun's hides it)
    error: str | None = None
    oom: dict[str, Any] | None = None  # the out-of-memory diagnosis (trainer.memory.diagnose)
    preempt_skipped: str | None = None  # why no preempt checkpoint was written on the stop signal

    #: fields that belong to one activity: cleared when the activity changes
    ACTIVITY_FIELDS: ClassVar[tuple[str, ...]] = ("eval_batch", "eval_batches")

    @property
    def resume_known(self) -> bool:
        """The attempt's resume point (and the checkpoints it skipped) is in the document."""
        return self.start_step is not None

    @property
    def evaluating(self) -> bool:
        return self.activity in EVALUATING

    def update(self, fields: dict[str, Any]) -> None:
        """Fold a beat's fields in (by name: ``activity`` or ``phase``); an unknown name is an
        error in the writer, not a new key."""
        if "phase" in fields:
            fields = {("activity" if key == "phase" else key): value for key, value in fields.items()}
        activity = fields.get("activity")
        if activity is not None and activity != self.activity:
            for key in self.ACTIVITY_FIELDS:
                setattr(self, key, None)
                self.__pydantic_fields_set__.discard(key)  # gone from the document, not null
        for key, value in fields.items():
            if key not in type(self).model_fields:
                raise AttributeError(f"the heartbeat has no field {key!r}")
            setattr(self, key, value.value if isinstance(value, enum.Enum) else value)

    def to_doc(self) -> dict[str, Any]:
        """The JSON document: the fields a beat set (null: set to nothing, a busy call ended)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @classmethod
    def parse(cls, text: str | bytes | dict[str, Any] | None) -> Heartbeat | None:
        """The document, or None when it is missing, torn or not a heartbeat."""
        if text is None:
            return None
        try:
            doc = json.loads(text) if isinstance(text, (str, bytes)) else text
            return cls.model_validate(doc) if isinstance(doc, dict) else None
        except (ValueError, ValidationError):
            return None
