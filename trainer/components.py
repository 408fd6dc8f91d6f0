"""What a trainer process is built from: the job's identity, the parts built once (device, data,
backbone) and the live training state a checkpoint holds.

Invariants:
- A job is what it trains on: its identity hashes the data's content, wherever the file lies
  (storage.data_digest), so the same spec over other data is another job.
- ``fresh_state`` seeds exactly as any first start does: a retrain from nothing computes what
  the first run computed, whatever was built (or drawn) before it.
- Under torchrun rank 0 builds the backbone first (it alone writes the cache); the other ranks
  read what it wrote. An LLM-free variant (``model.ablation``) builds none.
- ``train.deterministic`` is applied (trainer.determinism) before the first kernel runs, and the
  platform that decides the kernels is part of the parts, for every checkpoint.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from timellm_job.jobs import JobSpec, job_hashes, spec_hash
from timellm_job.jobs.protocol import TrainerActivity as Activity
from timellm_job.storage import Store
from timellm_job.storage.data_digest import DataUnreadable, data_sha256
from timellm_job.trainer import determinism, distributed, memory
from timellm_job.trainer.backbone import Backbone, default_device, hub_cache_bytes, load_backbone
from timellm_job.trainer.backbone_cache import load_cached, prefetch
from timellm_job.trainer.checkpoint_state import Progress
from timellm_job.trainer.data import DataError, Splits, data_options, load_splits
from timellm_job.trainer.model import TimeLLM
from timellm_job.trainer.reporting import HeartbeatWriter
from timellm_job.trainer.stopping import StopFlag

DOWNLOAD_LIMIT_S = 4 * 3600  # downloading 16 GB on a slow link; after it, silence reads as a hang


@dataclass(frozen=True)
class Identity:
    """What the job is: its data's content and the spec's hash over it (this version's, and the
    hashes earlier versions gave the same job)."""

    data_sha256: str
    hash: str
    hashes: frozenset[str]


def identify(spec: JobSpec) -> Identity:
    try:
        digest = data_sha256(spec.data.path, data_options(spec), remember=True)
    except DataUnreadable as exc:
        raise DataError(f"data.path: {exc}") from None
    return Identity(digest, spec_hash(spec, digest), job_hashes(spec, digest))


@dataclass
class Parts:
    """Built once per process, never checkpointed: the device, the data and the frozen backbone."""

    device: str
    card: memory.Card
    compute_dtype: str
    splits: Splits
    steps_per_epoch: int
    total_steps: int
    scaling: dict[str, Any]  # the data's scaler, for results.json and exports
    backbone: Backbone | None  # None: an LLM-free variant (model.ablation)
    platform: dict[str, Any]  # what decides the kernels (trainer.determinism), in every checkpoint


def build_parts(spec: JobSpec, world: distributed.World, job: Store, heartbeat: HeartbeatWriter,
                stop: StopFlag, attempt: int) -> Parts:
    device = distributed.init(world, default_device(spec.train.device))
    card = memory.card_of(device)
    compute_dtype = memory.compute_dtype(spec.model.compute_dtype, card)
    llm = spec.model.ablation == "none"  # the LLM-free variants build no backbone
    # the cached backbone is read and verified while the rest starts (imports, data)
    fetching = prefetch(spec.model, device, job) if spec.run.backbone_cache and llm else None
    stop.device = device
    torch.manual_seed(spec.train.seed)
    determinism.apply(spec.train.deterministic, device)
    heartbeat.beat(force=True, activity=Activity.LOADING, host=socket.gethostname(), attempt=attempt)
    splits = load_splits(spec.data, data_options(spec))
    steps_per_epoch = len(splits.train) // spec.train.batch_size
    if steps_per_epoch < 1:
        raise DataError(f"train.batch_size: {spec.train.batch_size} exceeds the "
                        f"{len(splits.train)} training samples")
    sc = splits.scaler
    scaling = {"columns": splits.columns, "mean": sc.mean.tolist(), "std": sc.std.tolist(),
               "target": spec.data.target, "features": spec.data.features}
    backbone = None
    turns = ([0, 1] if world.distributed else [0]) if llm else []  # rank 0 first: it alone writes the cache
    for turn in turns:
        if (turn == 0) == world.main:
            pretrained = spec.model.backbone.pretrained
            measure = functools.partial(_download_bytes, pretrained) \
                if pretrained and not os.path.isdir(pretrained) else None
            with heartbeat.keepalive(DOWNLOAD_LIMIT_S, "loading the backbone", measure):  # a download
                backbone = load_cached(spec.model, device, job, fetching) if spec.run.backbone_cache \
                    else load_backbone(spec.model, device)
        distributed.barrier(world)
    source = backbone.source if backbone else f"none: model.ablation {spec.model.ablation}"
    heartbeat.beat(force=True, backbone_source=source)
    return Parts(device, card, compute_dtype, splits, steps_per_epoch, steps_per_epoch * spec.train.epochs,
                 scaling, backbone, determinism.platform(spec.train.deterministic, device))


def per_process_batch(spec: JobSpec, world: distributed.World) -> int:
    """The samples each process trains on of a batch (``train.batch_size`` is the global batch)."""
    return spec.train.batch_size // world.size


def _download_bytes(repo: str) -> dict:
    return {"download_bytes": hub_cache_bytes(repo)}


@dataclass
class TrainingState:
    """The live state a checkpoint holds (trainer.checkpoint_state): trainable model, optimizer,
    schedule, loss scaler, progress. ``train_model`` is the model as trained (DDP-wrapped under
    torchrun), ``model`` the module itself."""

    model: TimeLLM
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress


def fresh_state(spec: JobSpec, world: distributed.World, parts: Parts) -> TrainingState:
    """The training state as a new job starts it (the same seeds as any first start)."""
    torch.manual_seed(spec.train.seed)  # trainable weights do not depend on how the backbone was built
    model = TimeLLM(spec.model, spec.data, parts.backbone).to(parts.device)
    model.train()
    train_model = distributed.wrap(world, model, parts.device)
    if world.rank > 0:  # rank 0 continues the stream of a single process; the others differ
        torch.manual_seed(spec.train.seed + world.rank)
    optimizer = torch.optim.Adam(list(model.trainable_state().values()), lr=spec.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.train.learning_rate, total_steps=parts.total_steps, pct_start=0.2)
    # dynamic loss scaling for fp16 compute (disabled, it is the identity)
    scaler = torch.amp.GradScaler(torch.device(parts.device).type, enabled=parts.compute_dtype == "fp16")
    return TrainingState(model, train_model, optimizer, scheduler, scaler, Progress())
