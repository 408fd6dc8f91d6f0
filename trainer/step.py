"""One optimizer step over this process's share of a global batch.

Invariants:
- The step sees the global ``train.batch_size`` however it is computed: the share is split into
  micro-batches of the memory plan's size whose losses, weighted by their share, are
  backpropagated one after the other into the same gradients (DDP synchronises on the last).
- fp16 compute scales the loss (torch.amp.GradScaler); a step whose gradients were inf/nan is
  skipped by the scaler and reported as skipped, never silently.
"""

from __future__ import annotations

import torch

from timellm_job.trainer import distributed
from timellm_job.trainer.components import TrainingState
from timellm_job.trainer.evaluation import target
from timellm_job.trainer.memory import MemoryPlan


def optimizer_step(state: TrainingState, plan: MemoryPlan, world: distributed.World, device: str, features: str,
                   x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Returns the share's loss and whether the loss scaler skipped the step."""
    n, micro = x.shape[0], plan.micro_batch_size
    state.optimizer.zero_grad(set_to_none=True)
    total = None
    for start in range(0, n, micro):
        xs, ys = x[start:start + micro].to(device), y[start:start + micro].to(device)
        with distributed.no_sync(world, state.train_model, last=start + micro >= n):
            loss = torch.nn.functional.mse_loss(target(state.train_model(xs), features), target(ys, features))
            if micro < n:  # the batch's mean: every micro-batch holds the same number of values
                loss = loss * (xs.shape[0] / n)
            state.scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if not state.scaler.is_enabled():
        state.optimizer.step()
        return total, False
    scale = state.scaler.get_scale()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return total, state.scaler.get_scale() < scale
