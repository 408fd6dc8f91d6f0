"""Reprogramming: text prototypes and the cross-attention that maps patches onto them.

Text prototypes are a learned linear map from the frozen vocabulary embeddings (V x d_llm) to
``num_tokens`` prototypes (S x d_llm). Patches attend to them: queries from patches, keys and
values from prototypes, ``n_heads`` heads of size ``d_keys``, projected to the LLM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def text_prototypes(mapping_layer: nn.Linear, word_embeddings_t: torch.Tensor) -> torch.Tensor:
    """word_embeddings_t [d_llm, V] (the backbone's dtype) -> prototypes [S, d_llm] in fp32.

    The product runs in the embeddings' dtype (bf16 on GPU: Llama-3's 128,256 x 4,096 table is
    never copied to fp32); gradients still reach the fp32 mapping weights through the cast.
    """
    dtype = word_embeddings_t.dtype
    out = nn.functional.linear(word_embeddings_t, mapping_layer.weight.to(dtype), mapping_layer.bias.to(dtype))
    return out.float().t()


class ReprogrammingLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_keys: int, d_llm: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_keys = n_heads, d_keys
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, patches: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        # patches [B', P, d_model], prototypes [S, d_llm] -> [B', P, d_llm]
        b, p, _ = patches.shape
        s, h, e = prototypes.shape[0], self.n_heads, self.d_keys
        q = self.query_projection(patches).view(b, p, h, e)
        k = self.key_projection(prototypes).view(s, h, e)
        v = self.value_projection(prototypes).view(s, h, e)
        scores = torch.einsum("bphe,she->bhps", q, k) / math.sqrt(e)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.einsum("bhps,she->bphe", attn, v).reshape(b, p, h * e)
        return self.out_projection(out)
