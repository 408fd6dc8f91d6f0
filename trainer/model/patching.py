"""Patch embedding: replication-pad the end by ``stride``, cut patches of ``patch_len`` every
``stride``, embed each patch to ``d_model`` with a 1-D convolution over the patch sequence."""

from __future__ import annotations

import torch
from torch import nn


def num_patches(seq_len: int, patch_len: int, stride: int) -> int:
    return (seq_len + stride - patch_len) // stride + 1


class TokenEmbedding(nn.Module):
    """A circular 1-D convolution (kernel 3) from patch values to d_model channels."""

    def __init__(self, patch_len: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(patch_len, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches [B', P, patch_len] -> [B', P, d_model]
        return self.tokenConv(patches.transpose(1, 2)).transpose(1, 2)


class PatchEmbedding(nn.Module):
    def __init__(self, d_model: int, patch_len: int, stride: int, dropout: float):
        super().__init__()
        self.patch_len, self.stride = patch_len, stride
        self.padding = nn.ReplicationPad1d((0, stride))
        self.value_embedding = TokenEmbedding(patch_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B', T] -> patches [B', P, patch_len] -> [B', P, d_model]
        x = self.padding(x.unsqueeze(1)).squeeze(1)
        patches = x.unfold(-1, self.patch_len, self.stride)
        return self.dropout(self.value_embedding(patches))
