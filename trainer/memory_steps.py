"""The trainer's memory steps: the plan put in force before the first step (probing the GPU
where there is one), and the diagnosis when memory runs out. The planning itself, a pure
function of the card, the spec and the last attempt's plan, is trainer.memory's.

Invariants:
- Rank 0 decides the plan; every rank follows it (broadcast), and the heartbeat carries it.
- A probe leaves no trace in the training state (no gradients, no optimizer state, no RNG draw
  that the run would see).
- Out of memory is a diagnosis, not a crash: exit 4 with the heartbeat's ``oom``.
"""

from __future__ import annotations

import logging

import torch

from timellm_job.jobs import JobSpec
from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.trainer import distributed, memory
from timellm_job.trainer.backbone import default_device
from timellm_job.trainer.components import Parts, TrainingState, per_process_batch
from timellm_job.trainer.data import train_batches
from timellm_job.trainer.evaluation import target
from timellm_job.trainer.grad_checkpointing import set_gradient_checkpointing
from timellm_job.trainer.reporting import HeartbeatWriter

log = logging.getLogger(__name__)


def plan_memory(spec: JobSpec, world: distributed.World, parts: Parts, state: TrainingState,
                previous_plan: dict | None, heartbeat: HeartbeatWriter) -> memory.MemoryPlan:
    """Decide the memory plan (rank 0 decides, every rank follows) and put it in force."""
    plan = None
    if world.main:
        probe = (lambda micro, checkpointing: probe_peak(spec, parts, state, micro, checkpointing)) \
            if parts.card.gpu else None
        checkpointing = memory.checkpointing(spec.train.gradient_checkpointing, parts.card)
        plan = memory.decide(spec, parts.card, parts.compute_dtype, checkpointing,
                             per_process_batch(spec, world), previous_plan, probe)
    plan = distributed.broadcast(world, plan)
    if parts.backbone is not None:
        set_gradient_checkpointing(parts.backbone.model, plan.gradient_checkpointing)
    if world.main:
        log.info("memory plan: %s", plan.describe())
    heartbeat.beat(force=True, memory_plan=plan.to_json())
    return plan


def probe_peak(spec: JobSpec, parts: Parts, state: TrainingState, micro: int, checkpointing: bool) -> int:
    """Peak GPU memory of one forward + backward at ``micro`` samples (plus the optimizer's
    moments, when they do not exist yet); leaves no trace in the training state."""
    if parts.backbone is not None:
        set_gradient_checkpointing(parts.backbone.model, checkpointing)
    _, (x, y, _) = next(iter(train_batches(parts.splits.train, micro, spec.train.seed, 0, 0)))
    params = list(state.model.trainable_state().values())
    with memory.no_trace(parts.device):
        torch.cuda.reset_peak_memory_stats(parts.device)
        try:
            out = state.model(x.to(parts.device))
            loss = torch.nn.functional.mse_loss(target(out, spec.data.features),
                                                target(y.to(parts.device), spec.data.features))
            loss.backward()
            del out, loss
            peak = memory.peak_bytes(parts.device)
        finally:
            for param in params:
                param.grad = None
    if not state.optimizer.state:
        peak += 2 * sum(param.numel() * param.element_size() for param in params)  # Adam's moments
    return peak


def out_of_memory(spec: JobSpec, exc: BaseException, plan: memory.MemoryPlan | None, parts: Parts | None,
                  state: TrainingState | None, heartbeat: HeartbeatWriter) -> ExitCode:
    """A diagnosis, not a crash: what ran out, at which plan, and what to change."""
    device = parts.device if parts else default_device(spec.train.device)  # out of memory while building
    card = parts.card if parts else memory.card_of(device)
    planning = str(exc) if isinstance(exc, memory.OutOfPlans) else None
    diag = memory.diagnose(spec, plan, card, device, planning, heartbeat.doc.evaluating)
    log.info("%s", diag["reason"])
    p = state.progress if state else None
    heartbeat.beat(force=True, activity=Activity.CRASHED, oom=diag, error=diag["reason"][:500],
                   exit_code=ExitCode.OUT_OF_MEMORY, **({"step": p.global_step, "epoch": p.epoch} if p else {}))
    return ExitCode.OUT_OF_MEMORY
