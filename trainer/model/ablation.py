"""The LLM-free variants of Time-LLM (``model.ablation``), as Tan et al. define them ("Are Language
Models Actually Useful for Time Series Forecasting?", NeurIPS 2024):

- ``no_llm``: the patch embeddings go straight to the output projection;
- ``attention``: through one randomly initialised multi-head self-attention layer;
- ``transformer``: through one randomly initialised transformer encoder block.

There is no LLM to read a prompt or text prototypes, so neither is built: normalize -> patch
embedding -> (the layer) -> flatten head over every patch's ``d_model`` features -> denormalize.
The layer is trained with the rest and is part of the checkpoint like every trainable part.
"""

from __future__ import annotations

import torch
from torch import nn

ABLATIONS = ("no_llm", "attention", "transformer")
FEEDFORWARD = 2048  # the transformer block's inner width: torch's default, as Tan et al. leave it


class SelfAttention(nn.Module):
    """One multi-head self-attention layer over the patch sequence."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def mixing_layer(kind: str, d_model: int, n_heads: int, dropout: float) -> nn.Module | None:
    """What stands in the LLM's place (None: nothing)."""
    if kind == "attention":
        return SelfAttention(d_model, n_heads, dropout)
    if kind == "transformer":
        return nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=FEEDFORWARD, dropout=dropout,
                                          batch_first=True)
    return None


def mixing_parameters(kind: str, d_model: int) -> int:
    """The mixing layer's trainable parameters, without building it."""
    attention = 4 * d_model * d_model + 4 * d_model  # in-projection (q, k, v) and out-projection, with biases
    if kind == "attention":
        return attention
    if kind == "transformer":  # and two linear layers and two layer norms
        return attention + 2 * d_model * FEEDFORWARD + FEEDFORWARD + d_model + 4 * d_model
    return 0
