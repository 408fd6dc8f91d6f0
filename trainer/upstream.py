"""Adopting a run of the upstream Time-LLM code: its checkpoints become ours.

Upstream writes either a ``torch.save`` dict (``model``, ``optimizer``, ``scheduler``, ``epoch``,
``global_step``, ``best_score``, ``val_loss_min``) or a bare model state dict (its early
stopping's ``checkpoint`` file), possibly with DDP's ``module.`` prefix and the frozen LLM in it.

Invariants:
- Files are read with ``torch.load(weights_only=True)``, allowing besides tensors and plain
  values exactly the numpy scalars that upstream's early stopping stores (``val_loss_min`` and
  ``best_score`` are ``np.float64``/``np.float32``: a numpy scalar and its dtype). Any other global
  refuses the file with :class:`ImportRefused` naming it; nothing in it is run.
- Local files are memory-mapped (``mmap=True``): only the tensors kept are ever read, so a
  checkpoint holding the frozen LLM (gigabytes) costs no more memory than one without it.
- The name mapping lives here alone (:data:`NAME_MAP`); frozen backbone entries are dropped.
- Any parameter whose name or shape does not match the job's model refuses the import, with a
  table of the differences; nothing is written.
- The optimizer and scheduler carry over only when their shapes and kinds match; otherwise the
  import needs ``weights_only`` (fresh Adam, fresh schedule from the imported step).
- Early-stopping state (``val_loss_min``) carries over, so a worse model never replaces it.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from timellm_job.jobs.messages import first_line

# upstream's module names -> ours (the same blocks of the paper; kept as one table on purpose)
NAME_MAP = {
    "patch_embedding.value_embedding.tokenConv.weight": "patch_embedding.value_embedding.tokenConv.weight",
    "mapping_layer.weight": "mapping_layer.weight",
    "mapping_layer.bias": "mapping_layer.bias",
    **{f"reprogramming_layer.{p}_projection.{w}": f"reprogramming_layer.{p}_projection.{w}"
       for p in ("query", "key", "value", "out") for w in ("weight", "bias")},
    "output_projection.linear.weight": "output_projection.linear.weight",
    "output_projection.linear.bias": "output_projection.linear.bias",
}
FROZEN_PREFIXES = ("llm_model.", "word_embeddings", "normalize_layers.")
# the numpy globals of an early-stopping value (np.float64 / np.float32) or a numpy counter
# (np.int64 / np.int32): the scalar constructor (under numpy 2's module name and numpy 1's), the
# dtype and those four dtype classes; nothing else
_SCALAR = np._core.multiarray.scalar
_DTYPES = [np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType, np.dtypes.Int32DType]
NUMPY_SCALARS = [_SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype, *_DTYPES]
ALLOWED = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype",
           *(f"numpy.dtypes.{d.__name__}" for d in _DTYPES)}


class ImportRefused(ValueError):
    """The file cannot be imported into this job; the message says why (and what to do)."""


@dataclass
class Upstream:
    params: dict[str, torch.Tensor]
    optimizer: dict | None = None
    scheduler: dict | None = None
    epoch: int = 0
    global_step: int = 0
    val_loss_min: float | None = None
    dropped: list[str] = field(default_factory=list)


def _refusal(path: Path) -> ImportRefused:
    """Why a file cannot be loaded without unpickling, naming the globals it would run."""
    try:
        found = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - ALLOWED)
    except Exception:  # noqa: BLE001 - the file is refused either way
        found = []
    named = f"it holds {', '.join(found)}, which" if found else "it holds objects that"
    return ImportRefused(f"{path.name}: {named} only full unpickling (running code from the file) could "
                         "rebuild; timellm-job loads tensors, plain numbers and numpy scalars only. Save the "
                         "checkpoint's tensors and plain numbers (float(val_loss_min), ...) and import that.")


def read_upstream(path: str | Path) -> Upstream:
    """Read an upstream checkpoint from a local file, memory-mapped where the format allows."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # the legacy (pre-zip) format cannot be mapped
                if zipfile.is_zipfile(path):
                    raise ImportRefused(f"{path.name}: not a readable torch checkpoint: "
                                        f"{first_line(exc, 200)}") from None
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path) from None
    if not isinstance(obj, dict):
        raise ImportRefused(f"expected a dict, found {type(obj).__name__}")
    full = "model" in obj and isinstance(obj["model"], dict)
    state = obj["model"] if full else obj
    params, dropped = {}, []
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            continue
        name = name.removeprefix("module.")
        if name.startswith(FROZEN_PREFIXES):
            dropped.append(name)
            continue
        params[NAME_MAP.get(name, name)] = tensor
    if not full:
        return Upstream(params, dropped=dropped)

    def number(key, default):
        v = obj.get(key, default)
        return v.item() if torch.is_tensor(v) or isinstance(v, np.generic) else v

    val = number("val_loss_min", None)
    if val is None and obj.get("best_score") is not None:
        val = -float(number("best_score", 0.0))
    return Upstream(params, obj.get("optimizer"), obj.get("scheduler"), int(number("epoch", 0)),
                    int(number("global_step", 0)), None if val is None else float(val), dropped)


def mismatches(model, params: dict[str, torch.Tensor]) -> list[tuple[str, str, str]]:
    """(name, in the job's model, in the file) for every parameter that differs."""
    live = model.trainable_state()
    rows = []
    for name in sorted(set(live) | set(params)):
        ours = tuple(live[name].shape) if name in live else None
        theirs = tuple(params[name].shape) if name in params else None
        if ours != theirs:
            rows.append((name, str(ours) if ours else "-", str(theirs) if theirs else "-"))
    return rows


def optimizer_problems(optimizer, sd: dict | None) -> list[str]:
    if not sd:
        return ["the file has no optimizer state"]
    groups = sd.get("param_groups") or []
    ours = optimizer.state_dict()
    if len(groups) != len(ours["param_groups"]) or \
            sum(len(g["params"]) for g in groups) != sum(len(g["params"]) for g in ours["param_groups"]):
        return ["its optimizer has other parameter groups than the job's Adam"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    problems = []
    for idx, st in (sd.get("state") or {}).items():
        i = int(idx)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                problems.append(f"optimizer state {i} has no {key} (not Adam)")
            elif i >= len(params) or tuple(st[key].shape) != tuple(params[i].shape):
                problems.append(f"optimizer state {i}.{key} has shape {tuple(st[key].shape)}")
    return problems


def scheduler_problems(scheduler, sd: dict | None) -> list[str]:
    if not sd:
        return ["the file has no scheduler state"]
    ours = scheduler.state_dict()
    if set(sd) - {"anneal_func"} != set(ours) - {"anneal_func"}:
        return ["its scheduler is not a OneCycleLR"]
    if sd.get("total_steps") != ours["total_steps"]:
        return [f"its OneCycleLR spans {sd.get('total_steps')} steps, the job's {ours['total_steps']}"]
    return []
