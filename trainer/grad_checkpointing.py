"""Gradient checkpointing through the frozen backbone.

The backbone is frozen and in eval mode, where transformers' own gradient checkpointing does not
act (it is tied to training mode). Here each of its blocks (the largest ``nn.ModuleList`` of the
model: LLaMA's ``layers``, GPT-2's ``h``, BERT's ``encoder.layer``) runs under
``torch.utils.checkpoint`` (non-reentrant) whenever autograd records: its activations are
dropped after the forward pass and recomputed in the backward pass. Gradients reach the inputs
(the reprogrammed patches) exactly as without it: the recomputation repeats the same kernels on
the same inputs (the frozen backbone has no dropout in eval mode, and the RNG state is restored
for it anyway), so on a CPU the trainable layers' gradients are the same bit for bit.

Invariants: ``set_gradient_checkpointing`` is idempotent and reversible; under ``no_grad``
(validation, test) blocks run as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ORIGINAL = "_timellm_forward"


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks: its largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks to checkpoint")
    return max(lists, key=len)


def _recomputed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    for block in blocks(model):
        original = block.__dict__.get(_ORIGINAL)
        if original is None:
            original = block.forward
            setattr(block, _ORIGINAL, original)
        if on:
            block.forward = functools.partial(_recomputed, original)
        else:
            block.__dict__.pop("forward", None)


def is_on(model: nn.Module) -> bool:
    return isinstance(blocks(model)[0].__dict__.get("forward"), functools.partial)
