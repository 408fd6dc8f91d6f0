"""Checks that need the data or torch, run before a job writes anything.

Each problem is one line naming the spec field. Nothing is written; a hub backbone that is not
on this machine is left to the run (checking it would mean downloading it).

It runs before every start of a job (the orchestrator waits on it), so it stays cheap: it finds
bitsandbytes without importing it (importing it compiles its ops: about 1.5 s on a CPU).
"""

from __future__ import annotations

import importlib.util

import torch

from jobs import JobSpec
from trainer.backbone import BackboneError, default_device
from trainer.data import DataError, data_options, load_splits


def preflight(spec: JobSpec) -> list[str]:
    problems = []
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
    if spec.model.quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"model.quantization: {spec.model.quantization} needs bitsandbytes, "
                            "which is not installed")
    return problems
