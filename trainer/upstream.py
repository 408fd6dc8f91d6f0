"""Adopting a run of the upstream Time-LLM code: its checkpoints become ours.

Upstream writes either a ``torch.save`` dict (``model``, ``optimizer``, ``scheduler``, ``epoch``,
``global_step``, ``best_score``, ``val_loss_min``) or a bare model state dict (its early
stopping's ``checkpoint`` file), possibly with DDP's ``module.`` prefix and the frozen LLM in it.

Invariants:
- Files are read with ``torch.load(weights_only=True)``: a file that needs full unpickling is
  refused with :class:`ImportRefused`, never loaded.
- The name mapping lives here alone (:data:`NAME_MAP`); frozen backbone entries are dropped.
- Any parameter whose name or shape does not match the job's model refuses the import, with a
  table of the differences; nothing is written.
- The optimizer and scheduler carry over only when their shapes and kinds match; otherwise the
  import needs ``weights_only`` (fresh Adam, fresh schedule from the imported step).
- Early-stopping state (``val_loss_min``) carries over, so a worse model never replaces it.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field

import torch

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


def read_upstream(data: bytes) -> Upstream:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ImportRefused("this file needs full unpickling (arbitrary code) to load, which timellm-job never "
                            f"does; re-save it with plain tensors and numbers ({str(exc).splitlines()[0]})") from None
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
        return v.item() if torch.is_tensor(v) else v

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
