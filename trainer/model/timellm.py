"""The Time-LLM forecaster around a frozen backbone.

Shapes: x [B, T=seq_len, N] -> forecast [B, H=pred_len, N]. Only the reprogramming parts are
trainable (patch embedding, mapping layer, reprogramming layer, output projection);
:meth:`TimeLLM.trainable_state` is what checkpoints hold; the backbone is never saved.
With ``model.ablation`` (trainer.model.ablation) there is no backbone: the patch embeddings go
through the layer that stands in the LLM's place (or none) to the output projection.
"""

from __future__ import annotations

import torch
from torch import nn

from timellm_job.trainer.backbone import Backbone
from timellm_job.trainer.model.ablation import mixing_layer, mixing_parameters
from timellm_job.trainer.model.head import FlattenHead
from timellm_job.trainer.model.normalize import denormalize, normalize
from timellm_job.trainer.model.patching import PatchEmbedding, num_patches
from timellm_job.trainer.model.prompt import build_prompts, description_for
from timellm_job.trainer.model.reprogramming import ReprogrammingLayer, text_prototypes


def trainable_parameters(model_spec, data_spec, vocab: int, d_llm: int) -> dict[str, int]:
    """The trainable parameters of :class:`TimeLLM`, by the spec field that sizes each part,
    without building it (pre-flight's memory and storage estimates; tests check it against the
    built model)."""
    m = model_spec
    keys = m.d_ff * m.n_heads  # the reprogramming layer's queries/keys/values (d_keys = d_ff)
    patches = num_patches(data_spec.seq_len, m.patch_len, m.stride)
    if m.ablation != "none":
        return {"model.d_model": m.patch_len * m.d_model * 3 + mixing_parameters(m.ablation, m.d_model),
                "data.pred_len": m.d_model * patches * data_spec.pred_len + data_spec.pred_len}
    return {"model.d_model": m.patch_len * m.d_model * 3 + m.d_model * keys + keys,
            "model.num_tokens": vocab * m.num_tokens + m.num_tokens,
            "model.d_ff": 2 * (d_llm * keys + keys) + keys * d_llm + d_llm,
            "data.pred_len": m.d_ff * patches * data_spec.pred_len + data_spec.pred_len}


class TimeLLM(nn.Module):
    def __init__(self, model_spec, data_spec, backbone: Backbone | None):
        super().__init__()
        m = model_spec
        self.seq_len, self.pred_len, self.d_ff = data_spec.seq_len, data_spec.pred_len, m.d_ff
        self.description = description_for(data_spec.kind, m.description)
        self.n_patches = num_patches(data_spec.seq_len, m.patch_len, m.stride)
        self.backbone = backbone  # not a submodule: frozen, never saved, never optimized
        self.ablation = m.ablation
        self.patch_embedding = PatchEmbedding(m.d_model, m.patch_len, m.stride, m.dropout)
        if self.ablation != "none":
            self.mixing = mixing_layer(m.ablation, m.d_model, m.n_heads, m.dropout)
            self.output_projection = FlattenHead(m.d_model * self.n_patches, data_spec.pred_len, m.dropout)
            return
        vocab = backbone.word_embeddings.shape[0]
        self.mapping_layer = nn.Linear(vocab, m.num_tokens)
        self.reprogramming_layer = ReprogrammingLayer(m.d_model, m.n_heads, m.d_ff, backbone.width, m.dropout)
        self.output_projection = FlattenHead(m.d_ff * self.n_patches, data_spec.pred_len, m.dropout)

    @property
    def word_embeddings_t(self) -> torch.Tensor:
        """The frozen vocabulary embeddings, transposed: a view, never a copy (1 GB for Llama-3)."""
        return self.backbone.word_embeddings.detach().t()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def tokenize_prompts(self, x_series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = build_prompts(x_series.detach().float().cpu(), self.description, self.seq_len, self.pred_len)
        # the tokenizer's own special tokens, as upstream: LLaMA's BOS, BERT's [CLS] ... [SEP]; GPT-2 none
        enc = self.backbone.tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape
        x_norm, mean, std = normalize(x)                                   # [B, T, N]
        series = x_norm.permute(0, 2, 1).reshape(b * n, t)                 # channel independence: [B*N, T]
        if self.ablation != "none":
            return denormalize(self._without_llm(series, b, n), mean, std)
        ids, mask = self.tokenize_prompts(series)
        device = x.device
        llm = self.backbone.model
        prompt_emb = llm.get_input_embeddings()(ids.to(device))           # [B*N, L, d_llm]
        patches = self.patch_embedding(series)                             # [B*N, P, d_model]
        prototypes = text_prototypes(self.mapping_layer, self.word_embeddings_t)  # [S, d_llm]
        reprogrammed = self.reprogramming_layer(patches, prototypes)       # [B*N, P, d_llm]
        inputs = torch.cat([prompt_emb, reprogrammed.to(prompt_emb.dtype)], dim=1)
        full_mask = torch.cat([mask, torch.ones(b * n, self.n_patches, dtype=mask.dtype)], dim=1).to(device)
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)            # left padding keeps positions from 0
        hidden = llm(inputs_embeds=inputs, attention_mask=full_mask, position_ids=positions,
                     use_cache=False).last_hidden_state  # training keeps no key/value cache
        features = hidden[:, -self.n_patches:, : self.d_ff].float()       # [B*N, P, d_ff]
        features = features.reshape(b, n, self.n_patches, self.d_ff).permute(0, 1, 3, 2)  # [B, N, d_ff, P]
        forecast = self.output_projection(features).permute(0, 2, 1)       # [B, H, N]
        return denormalize(forecast, mean, std)

    def _without_llm(self, series: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """The ablation's forecast, normalized: [B*N, T] -> [B, H, N]."""
        patches = self.patch_embedding(series)                             # [B*N, P, d_model]
        if self.mixing is not None:
            patches = self.mixing(patches)
        features = patches.reshape(b, n, self.n_patches, -1)              # [B, N, P, d_model]
        return self.output_projection(features).permute(0, 2, 1)           # [B, H, N]
