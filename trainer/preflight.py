"""Checks that need the data or torch, run before a job writes anything.

Each problem is one line naming the spec field. Nothing is written. A hub backbone's config (one
small file) is fetched once: a repo or revision that does not exist, or a gated one without a
token, is a problem; a hub that does not answer is only a warning (the run retries it, and a job
whose quantized backbone is cached beside it needs no hub at all).

From the backbone's config it sizes the job (trainer.footprint): trainable layers that would not
fit this machine's memory (weights, gradients, Adam) are a problem naming the field that sizes
them; the estimate of a checkpoint's and the backbone cache's bytes is printed on standard
output as one JSON line, for ``submit``'s check of the store's free space.

It runs before every start of a job (the orchestrator waits on it), so it stays cheap: the one
costly check is the quantization's, a 16x16 layer quantized and run on the job's device by the
installed bitsandbytes (about 1.5 s on a CPU, most of it importing bitsandbytes), because some
releases install fine and then cannot run a quantization on a device (0.45 and NF4 on a CPU).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import psutil
import torch

from timellm_job.jobs import JobSpec
from timellm_job.jobs.messages import first_line
from timellm_job.trainer import footprint, memory
from timellm_job.trainer.backbone import BackboneError, HubUnreachable, default_device, from_hub
from timellm_job.trainer.data import DataError, data_options, load_splits

log = logging.getLogger(__name__)


def preflight(spec: JobSpec, estimate: dict | None = None) -> list[str]:
    """The problems found (one line each); ``estimate`` receives the job's footprint, when the
    backbone's config told enough to size it (trainer.footprint)."""
    problems = []
    device = None
    config = None
    try:
        device = default_device(spec.train.device)
        if device == "cuda" and spec.train.nproc > torch.cuda.device_count():
            problems.append(f"train.nproc: {spec.train.nproc} processes need as many GPUs; this machine has "
                            f"{torch.cuda.device_count()}")
    except BackboneError as err:
        problems.append(str(err))
    try:
        splits = load_splits(spec.data, data_options(spec))
        if len(splits.train) < spec.train.batch_size:
            problems.append(f"train.batch_size: {spec.train.batch_size} exceeds the {len(splits.train)} "
                            f"training samples")
    except DataError as err:
        problems.append(str(err))
    pretrained = spec.model.backbone.pretrained
    if pretrained and not os.path.isdir(pretrained) and spec.model.ablation == "none":
        found, config = hub_config(pretrained, spec.model.backbone.revision)
        problems += found
    if device is not None:
        problems += size_problems(spec, device, config, estimate)
    if spec.model.quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"model.quantization: {spec.model.quantization} needs bitsandbytes, "
                            "which is not installed")
        elif device is not None:
            problem = quantization_problem(spec, device)
            if problem:
                problems.append(problem)
    return problems


def hub_config(name: str, revision: str | None):
    """(problems, the hub backbone's config or None)."""
    from transformers import AutoConfig

    try:
        return [], from_hub(lambda: AutoConfig.from_pretrained(name, revision=revision), name, within_s=0)
    except HubUnreachable as err:
        log.warning("warning: %s", err)  # not a problem: the run retries
    except (OSError, ValueError) as exc:
        cause = first_line(exc)
        return [f"model.backbone.pretrained: cannot load {name!r}: {cause}"], None
    return [], None


def backbone_dims(spec: JobSpec, hub: object | None) -> footprint.BackboneDims | None:
    b = spec.model.backbone
    if b.random is not None:
        return footprint.random_dims(b.random)
    if b.pretrained and os.path.isdir(b.pretrained):
        try:
            with open(os.path.join(b.pretrained, "config.json")) as f:
                return footprint.dims_of(json.load(f))
        except (OSError, ValueError):
            return None
    return footprint.dims_of(hub) if hub is not None else None


def size_problems(spec: JobSpec, device: str, hub: object | None, estimate: dict | None) -> list[str]:
    """Trainable layers that would not fit the device (its memory, or the host's for a CPU)."""
    dims = backbone_dims(spec, hub)
    if dims is None:
        return []
    card = memory.card_of(device)
    dtype = memory.compute_dtype(spec.model.compute_dtype, card)
    size = footprint.footprint(spec, dims, 4 if dtype == "fp32" else 2)
    if estimate is not None:
        estimate.update(size.to_json())
    total = card.total_bytes if card.gpu and card.total_bytes else psutil.virtual_memory().total
    if size.training_bytes > 0.9 * total:
        return [f"{size.largest_field}: the trainable layers ({size.trainable_parameters:,} parameters) need about "
                f"{size.training_bytes / 2**30:.1f} GiB for their weights, gradients and Adam's moments, more than "
                f"this {'GPU' if card.gpu else 'machine'}'s {total / 2**30:.1f} GiB; lower {size.largest_field}"]
    return []


def quantization_problem(spec: JobSpec, device: str) -> str | None:
    """One line naming model.quantization if the installed bitsandbytes cannot quantize and run
    a small layer with the job's quantization, on its device, in its compute dtype."""
    import bitsandbytes as bnb

    q = spec.model.quantization
    dtype = memory.DTYPES[memory.compute_dtype(spec.model.compute_dtype, memory.card_of(device))]
    try:
        if q == "nf4":
            layer = bnb.nn.Linear4bit(16, 16, bias=False, quant_type="nf4", compute_dtype=dtype)
        else:
            layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False)
        layer = layer.to(device)  # quantizes the weights
        with torch.no_grad():
            out = layer(torch.randn(2, 16, device=device, dtype=dtype))
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("the layer's output is not finite")
    except Exception as exc:  # noqa: BLE001 - any failure means the job cannot run
        cause = first_line(exc, 200)
        return (f"model.quantization: {q} cannot run on {device} with the installed bitsandbytes "
                f"{getattr(bnb, '__version__', '?')} ({type(exc).__name__}: {cause}); install a bitsandbytes "
                f"that supports it there (0.50 runs nf4 and int8 on CPU and CUDA) or set model.quantization: none")
    return None
