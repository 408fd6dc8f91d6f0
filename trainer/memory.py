"""The memory plan: how one training step is computed on this machine's card.

A plan is the backbone's compute dtype, whether its activations are recomputed in the backward
pass (gradient checkpointing) and the micro-batch size, with the card it was made for and the
memory it measured. The trained model does not depend on it (the spec hash leaves it out);
only float rounding does (summation order, the dtype of the frozen backbone's activations).

How a plan is decided (``decide``), once per card:
- Fields the spec fixes are taken as written.
- ``model.compute_dtype: auto``: bf16 on a GPU of compute capability >= 8.0, fp16 below it (T4,
  V100: no native bf16; the loop then scales the loss, see ``GradScaler``), fp32 on a CPU.
- ``train.gradient_checkpointing: auto``: on for a GPU with less than 40 GiB, off on a CPU.
- ``train.micro_batch_size: auto``: the plan an earlier attempt recorded on the same card (its
  name and total memory) is reused as it is, so a resume computes exactly what the run before
  it did. Otherwise (a first attempt, another card, or an out-of-memory on this card) the
  candidates are tried in order, starting after the one that ran out of memory: every divisor
  of the per-process batch, largest first, with checkpointing as resolved; then, when
  checkpointing is ``auto`` and was resolved off, the same with it on. On a GPU each candidate
  is probed (forward + backward on real training windows) and the first whose peak, plus the
  optimizer's moments when they do not exist yet, stays under ``1 - HEADROOM`` of the card's
  budget wins; on a CPU there is nothing to measure and the first candidate is taken.
- Probing leaves no trace: RNG states are restored and gradients dropped.

Out of memory (``diagnose``): the trainer reports the card, its memory, the peak, the plan and
what to change, and whether a smaller plan exists; the orchestrator decides what follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from timellm_job.jobs.status import describe_plan

GiB = 1024**3
HEADROOM = 0.10  # of the card's budget, for fragmentation and what the probe does not see
CHECKPOINTING_BELOW = 40 * GiB
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Card:
    """The device a plan is made for: ``cpu``, or a GPU's name, memory and capability."""

    name: str
    total_bytes: int | None = None  # the budget: the card's memory, or the process's share of it
    capability: tuple[int, int] | None = None

    @property
    def gpu(self) -> bool:
        return self.capability is not None


def card_of(device: str) -> Card:
    if not device.startswith("cuda"):
        return Card("cpu")
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    total = props.total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:  # set_per_process_memory_fraction caps what this process may use
        total = int(total * fraction(index))
    return Card(props.name, total, (props.major, props.minor))


def compute_dtype(requested: str, card: Card) -> str:
    if requested != "auto":
        return requested
    if not card.gpu:
        return "fp32"
    return "bf16" if card.capability >= (8, 0) else "fp16"


def checkpointing(requested: bool | str, card: Card) -> bool:
    if requested != "auto":
        return bool(requested)
    return card.gpu and (card.total_bytes or 0) < CHECKPOINTING_BELOW


@dataclass
class MemoryPlan:
    micro_batch_size: int
    gradient_checkpointing: bool
    compute_dtype: str  # bf16 | fp16 | fp32
    batch_per_process: int
    card: str
    total_bytes: int | None = None
    probe_peak_bytes: int | None = None  # measured while planning (the chosen candidate)
    how: str = "spec"  # spec | probed | reused | default | after-oom
    note: str | None = None  # why it was planned again, when it was

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return describe_plan(self.to_json())


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def candidates(train_spec, batch_per_process: int, ckpt: bool) -> list[tuple[bool, int]]:
    """Every (checkpointing, micro-batch) the spec allows, preferred first."""
    micro = train_spec.micro_batch_size
    sizes = divisors_desc(batch_per_process) if micro == "auto" else [micro or batch_per_process]
    out = [(ckpt, m) for m in sizes]
    if train_spec.gradient_checkpointing == "auto" and not ckpt:
        out += [(True, m) for m in sizes]
    return out


def _same_card(previous: dict | None, card: Card) -> bool:
    return bool(previous) and previous.get("card") == card.name and previous.get("total_bytes") == card.total_bytes


Probe = Callable[[int, bool], int]  # (micro-batch, checkpointing) -> peak bytes; raises OutOfMemoryError


def decide(spec, card: Card, dtype: str, ckpt: bool, batch_per_process: int, previous: dict | None,
           probe: Probe | None) -> MemoryPlan:
    """The plan for this attempt. ``previous``: the plan recorded by the last attempt (with an
    ``oom`` entry when it ran out of memory), from the job's state; ``probe``: measures one
    candidate on the GPU (None on a CPU)."""
    train = spec.train
    plan = MemoryPlan(batch_per_process, ckpt, dtype, batch_per_process, card.name, card.total_bytes)
    options = candidates(train, batch_per_process, ckpt)
    if train.micro_batch_size != "auto":  # as written, even after an out-of-memory: the user decides
        plan.gradient_checkpointing, plan.micro_batch_size = options[0]
        return plan
    same = _same_card(previous, card)
    oom = (previous or {}).get("oom") if same else None
    if oom:  # start after the candidate that ran out of memory
        failed = (bool(oom.get("gradient_checkpointing")), int(oom.get("micro_batch_size") or 0))
        options = options[options.index(failed) + 1:] if failed in options else options
        plan.note = f"micro-batch {failed[1]} ran out of memory"
        if not options:
            raise OutOfPlans(f"no smaller plan than micro-batch {failed[1]} with gradient checkpointing "
                             f"{'on' if failed[0] else 'off'}")
    if same and not oom and previous.get("compute_dtype") == dtype and \
            (previous.get("gradient_checkpointing"), previous.get("micro_batch_size")) in options:
        plan.gradient_checkpointing, plan.micro_batch_size = previous["gradient_checkpointing"], \
            previous["micro_batch_size"]
        plan.probe_peak_bytes, plan.how = previous.get("probe_peak_bytes"), "reused"
        return plan
    if previous and not same:
        plan.note = f"planned again: the last plan was made on {previous.get('card')}" + \
            (f" ({previous['total_bytes'] / GiB:.1f} GiB)" if previous.get("total_bytes") else "")
    if probe is None:
        plan.gradient_checkpointing, plan.micro_batch_size = options[0]
        plan.how = "after-oom" if oom else "default"
        return plan
    budget = (card.total_bytes or 0) * (1 - HEADROOM)
    for ck, micro in options:
        try:
            peak = probe(micro, ck)
        except torch.OutOfMemoryError:
            continue
        if peak <= budget:
            plan.gradient_checkpointing, plan.micro_batch_size = ck, micro
            plan.probe_peak_bytes, plan.how = peak, "probed"
            return plan
    raise OutOfPlans(f"even micro-batch {options[-1][1]} with gradient checkpointing "
                     f"{'on' if options[-1][0] else 'off'} needs more than {budget / GiB:.1f} GiB")


class OutOfPlans(RuntimeError):
    """No candidate fits: the job cannot train on this card as specified."""


def has_smaller(spec, plan: MemoryPlan, card: Card) -> bool:
    """Whether ``auto`` could still pick a plan after this one (the orchestrator restarts then)."""
    if spec.train.micro_batch_size != "auto":
        return False
    options = candidates(spec.train, plan.batch_per_process, checkpointing(spec.train.gradient_checkpointing, card))
    here = (plan.gradient_checkpointing, plan.micro_batch_size)
    return here in options and options.index(here) < len(options) - 1


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated(torch.device(device)) if device.startswith("cuda") else None


def diagnose(spec, plan: MemoryPlan | None, card: Card, device: str, planning: str | None = None,
             evaluating: bool = False) -> dict:
    """What the attempt that ran out of memory reports: a one-line reason and the facts.
    ``planning``: why no plan fits, when it was the planning that failed; ``evaluating``: it ran
    out in validation or test, whose batches are ``train.eval_batch_size`` (no plan changes them)."""
    peak = peak_bytes(device)
    mem = f" ({card.total_bytes / GiB:.1f} GiB)" if card.total_bytes else ""
    if planning:
        plan, at = None, f"no memory plan fits: {planning}"
    elif plan:
        at = (f"at micro-batch {plan.micro_batch_size} of {plan.batch_per_process} per process, gradient "
              f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, {plan.compute_dtype}")
    else:
        at = "before the memory plan was made"
    smaller = plan is not None and not evaluating and has_smaller(spec, plan, card)
    advice = "planning a smaller micro-batch next" if smaller else (
        "set train.micro_batch_size: auto (or a smaller divisor of train.batch_size), "
        "train.gradient_checkpointing: true, or a shorter data.seq_len")
    if evaluating:
        at = f"while evaluating batches of train.eval_batch_size {spec.train.eval_batch_size}"
        advice = "set a smaller train.eval_batch_size, or a shorter data.seq_len"
    reason = (f"out of memory on {card.name}{mem}: peak {peak / GiB:.2f} GiB " if peak is not None else
              f"out of memory on {card.name}{mem}: ") + f"{at}, data.seq_len {spec.data.seq_len}; {advice}"
    return {"reason": reason, "card": card.name, "total_bytes": card.total_bytes, "peak_bytes": peak,
            "micro_batch_size": plan.micro_batch_size if plan else None,
            "gradient_checkpointing": plan.gradient_checkpointing if plan else None,
            "compute_dtype": plan.compute_dtype if plan else None, "smaller_plan": smaller}


@contextlib.contextmanager
def no_trace(device: str):
    """Run a probe without changing the RNG streams; free what it allocated afterwards."""
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            if cuda:
                torch.cuda.empty_cache()
