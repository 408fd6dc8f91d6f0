"""What a checkpoint holds, and its conversion to and from files (no pickle anywhere).

Files of a training checkpoint:
- ``model.safetensors``: the trainable parameters, fp32, under the model's parameter names.
- ``optimizer-<key>.safetensors``: the optimizer's tensors (``state.<i>.<key>``), one file per
  state key (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``), so that files of similar size are
  hashed in parallel on save and load.
- ``rng.safetensors``: the torch RNG states (``rng.torch``, ``rng.cuda.<d>``); in a run of
  several processes, rank r > 0's as ``rng.rank<r>.torch`` and ``rng.rank<r>.cuda.<d>``.
- ``trainer_state.json``: progress (epoch, batch in epoch, global step, stage), the optimizer's
  non-tensor state and param groups, the LR scheduler, the fp16 loss scaler (``scaler``, when
  one is in use), early stopping, the python and numpy RNG states (rank r > 0's under
  ``rng_ranks.<r>``), the validation history, and the memory plan it was trained under.

Invariants: ``capture`` copies every tensor to host memory (after it, training may mutate the
live tensors); ``restore`` puts back exactly what ``capture`` saw, bit for bit.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from timellm_job.trainer import safetensors_parts

MODEL_FILE = "model.safetensors"
OPTIMIZER_PREFIX = "optimizer-"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    epoch: int = 0  # the epoch being trained (== epochs when training is over)
    batch: int = 0  # the next batch of that epoch
    global_step: int = 0  # optimizer steps taken
    best_val: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0  # epochs since the best (early stopping)
    stopped_early: bool = False
    skipped_steps: int = 0  # optimizer steps the fp16 loss scaler skipped (inf/nan gradients)
    history: list[dict] = field(default_factory=list)  # one entry per validated epoch

    def order(self) -> list[int]:
        """Sort key of a checkpoint taken now: later in training = larger."""
        return [self.global_step, self.epoch, self.batch]


def rng_capture() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def rng_restore(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    v, keys, gauss = doc["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer(sd: dict, copy) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        plain[str(idx)] = {}
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = copy(f"state.{idx}.{key}", value)
            else:
                plain[str(idx)][key] = value
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in doc["state"].items()}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": doc["param_groups"]}


@dataclass
class Snapshot:
    """A host-memory copy of everything a checkpoint holds, ready to serialize off-thread."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    doc: dict[str, Any]

    def to_files(self) -> dict[str, list[memoryview] | bytes]:
        """File name -> its bytes, as buffers over the snapshot's tensors (no copy)."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.optimizer.items():
            file = RNG_FILE if name.startswith("rng.") else f"{OPTIMIZER_PREFIX}{name.split('.', 2)[2]}.safetensors"
            groups.setdefault(file, {})[name] = tensor
        files: dict[str, list[memoryview] | bytes] = {MODEL_FILE: safetensors_parts.parts(self.model)}
        files.update({file: safetensors_parts.parts(tensors) for file, tensors in sorted(groups.items())})
        files[STATE_FILE] = json.dumps(self.doc, sort_keys=True).encode()
        return files


class HostBuffers:
    """Host tensors reused from one capture to the next, so a save copies into memory that is
    already mapped (pinned, when the model is on a GPU) instead of allocating 1.7 GB each time.
    Reuse is safe because the saver waits for the previous write before the next capture."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self.buffers[name] = buf
        buf.copy_(t, non_blocking=t.device.type == "cuda")
        return buf


def capture(model, optimizer, scheduler, progress: Progress, buffers: HostBuffers | None = None,
            rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
            extra: dict[str, Any] | None = None) -> Snapshot:
    """Copy the training state to host memory (the only part of a save on the training path).

    With ``buffers``, the copies land in reused host tensors: the caller must not capture again
    before the previous snapshot has been written. ``rng``: every rank's ``rng_capture()`` in
    rank order (default: this process's only).
    """
    copy = (lambda _, t: t.detach().to("cpu", copy=True).contiguous()) if buffers is None else \
        (lambda name, t: buffers.copy(name, t))
    params = {k: copy(f"model.{k}", v) for k, v in model.trainable_state().items()}
    opt_tensors, opt_doc = _split_optimizer(optimizer.state_dict(), copy)
    ranks = rng if rng is not None else [rng_capture()]
    rng_tensors, rng_doc = dict(ranks[0][0]), ranks[0][1]
    for r, (tensors, _) in enumerate(ranks[1:], start=1):
        rng_tensors.update({f"rng.rank{r}.{k[len('rng.'):]}": v for k, v in tensors.items()})
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    doc = {"progress": asdict(progress), "optimizer": opt_doc, "scheduler": scheduler.state_dict(), "rng": rng_doc,
           **(extra or {})}
    if len(ranks) > 1:
        doc["rng_ranks"] = {str(r): d for r, (_, d) in enumerate(ranks[1:], start=1)}
    doc = json.loads(json.dumps(doc))  # a deep copy, and proof that it is plain JSON
    return Snapshot(params, {**opt_tensors, **rng_tensors}, doc)


def tensors_from(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors; no pickle involved. Storage hands out bytearrays: their
    tensors are views of them (no copy of a 1.5 GB optimizer state)."""
    return safetensors_parts.tensors(data) if isinstance(data, bytearray) else st_load(data)


def read_files(files: dict[str, bytes]) -> Snapshot:
    optimizer: dict[str, torch.Tensor] = {}
    for name, data in files.items():
        if name.startswith(OPTIMIZER_PREFIX) or name == RNG_FILE:
            optimizer.update(tensors_from(data))
    return Snapshot(tensors_from(files[MODEL_FILE]), optimizer, json.loads(files[STATE_FILE]))


def _rank_rng(snapshot: Snapshot, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if rank == 0:
        return {k: v for k, v in snapshot.optimizer.items() if k.startswith("rng.") and not k.startswith("rng.rank")}, \
            snapshot.doc["rng"]
    prefix = f"rng.rank{rank}."
    tensors = {"rng." + k[len(prefix):]: v for k, v in snapshot.optimizer.items() if k.startswith(prefix)}
    doc = snapshot.doc.get("rng_ranks", {}).get(str(rank))
    if not tensors or doc is None:
        raise ValueError(f"the checkpoint holds no RNG state for rank {rank}")
    return tensors, doc


def restore(snapshot: Snapshot, model, optimizer, scheduler, rank: int = 0, scaler=None) -> Progress:
    """Put a snapshot back into live objects (the RNG state of ``rank``; the loss scaler's state
    when both the checkpoint and this run scale the loss); returns the progress to continue from."""
    load_trainable(model, snapshot.model)
    opt_tensors = {k: v for k, v in snapshot.optimizer.items() if k.startswith("state.")}
    optimizer.load_state_dict(_join_optimizer(opt_tensors, snapshot.doc["optimizer"]))
    scheduler.load_state_dict(snapshot.doc["scheduler"])
    if scaler is not None and scaler.is_enabled() and snapshot.doc.get("scaler"):
        scaler.load_state_dict(snapshot.doc["scaler"])
    rng_restore(*_rank_rng(snapshot, rank))
    return Progress(**snapshot.doc["progress"])


def load_trainable(model, params: dict[str, torch.Tensor]) -> None:
    """Copy parameters into the model's trainable tensors; names and shapes must match exactly."""
    live = model.trainable_state()
    if set(live) != set(params):
        missing, extra = sorted(set(live) - set(params)), sorted(set(params) - set(live))
        raise ValueError(f"checkpoint parameters do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, tensor in live.items():
            if tensor.shape != params[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(params[name].shape)}, model {tuple(tensor.shape)}")
            tensor.copy_(params[name])
