"""Output projection: flatten the first ``d_ff`` features of every patch position, project to
``pred_len`` values (a linear 'flatten head')."""

from __future__ import annotations

import torch
from torch import nn


class FlattenHead(nn.Module):
    def __init__(self, n_inputs: int, pred_len: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(n_inputs, pred_len)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features [B, N, d_ff, P] -> [B, N, pred_len]
        return self.dropout(self.linear(features.flatten(start_dim=-2)))
