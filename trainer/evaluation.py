"""Validation and test: MSE/MAE over every window of a split, in normalized and in data units.

Invariants:
- Every sample counts (no dropped last batch, unlike upstream's test loader); no randomness
  (eval mode, fixed order), so replaying an evaluation is exact.
- With several processes each evaluates its share of the batches, every rank checks the stop
  flag the same number of times, and the sums are added across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from timellm_job.trainer import distributed
from timellm_job.trainer.data import Splits, eval_batches, eval_rounds
from timellm_job.trainer.stopping import StopFlag


@dataclass
class Evaluation:
    mse: float
    mae: float
    mse_raw: float | None = None
    mae_raw: float | None = None
    samples: int = 0


def target(out: torch.Tensor, features: str) -> torch.Tensor:
    """What is scored of a forecast (or of its truth): the target column alone under ``MS``."""
    return out[..., -1:] if features == "MS" else out


def evaluate(model, windows, batch_size: int, device: str, features: str, stop: StopFlag,
             splits: Splits | None = None, on_batch=None) -> Evaluation:
    """MSE/MAE over every sample (no dropped batch); in the data's units too when ``splits``.
    With several processes each evaluates its share of the batches and the sums are added."""
    world = stop.world
    model.eval()
    se = ae = se_raw = ae_raw = 0.0
    count = n = 0
    batches = eval_batches(windows, batch_size, world.rank, world.size)
    rounds = eval_rounds(windows, batch_size, world.size)
    with torch.no_grad():
        for i in range(rounds):
            stop.check()  # the same number of checks on every rank
            batch = next(batches, None)
            if batch is None:
                continue
            x, y, channel = batch
            if on_batch is not None:
                on_batch(i + 1, rounds)
            pred = target(model(x.to(device)).float().cpu(), features)
            y = target(y, features)
            se += float(((pred - y) ** 2).double().sum())
            ae += float((pred - y).abs().double().sum())
            count += y.numel()
            n += y.shape[0]
            if splits is not None:
                ch = torch.where(channel < 0, torch.full_like(channel, splits.target_index), channel)
                p_raw, y_raw = splits.scaler.inverse(pred.double(), ch), splits.scaler.inverse(y.double(), ch)
                se_raw += float(((p_raw - y_raw) ** 2).sum())
                ae_raw += float((p_raw - y_raw).abs().sum())
    model.train()
    se, ae, se_raw, ae_raw, count, n = distributed.sums(world, [se, ae, se_raw, ae_raw, count, n], device)
    count, n = int(count), int(n)
    if splits is None:
        return Evaluation(se / count, ae / count, samples=n)
    return Evaluation(se / count, ae / count, se_raw / count, ae_raw / count, n)
