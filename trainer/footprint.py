"""What a job holds, estimated before it starts: the memory of its trainable layers, the bytes
of one checkpoint and of its backbone cache, from the spec and the backbone's config alone.

Invariants:
- Nothing is built or downloaded: the trainable parameters come from
  :func:`trainer.model.timellm.trainable_parameters`, the backbone's size from its config
  (a random backbone's spec, a local folder's config.json, a hub config pre-flight fetched).
- Estimates err on the large side (every trainable tensor in fp32, Adam's two moments, the
  gradients); they decide refusals at submit, never how training runs.
- A backbone whose config says too little to size it gives no estimate (None), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from timellm_job.trainer.model.timellm import trainable_parameters

FP32 = 4
QUANTIZED_BYTES = {"nf4": 0.5 * 1.07, "int8": 1.0 * 1.02}  # the quantization constants besides the weights


@dataclass
class BackboneDims:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    gated_mlp: bool  # LLaMA's three MLP matrices (GPT-2 and BERT have two)


def dims_of(config) -> BackboneDims | None:
    """The sizes of a transformers config (or a dict of one), or None when it lacks them."""
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    vocab = get("vocab_size")
    hidden = get("hidden_size") or get("n_embd") or get("d_model")
    layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
    heads = get("num_attention_heads") or get("n_head") or get("num_heads")
    if not all(isinstance(v, int) and v > 0 for v in (vocab, hidden, layers, heads)):
        return None
    intermediate = get("intermediate_size") or get("n_inner") or 4 * hidden
    kv = get("num_key_value_heads") or heads
    model_type = str(get("model_type") or "")
    return BackboneDims(vocab, hidden, layers, int(intermediate), heads, int(kv), model_type in ("llama", "mistral"))


def random_dims(random_spec) -> BackboneDims:
    r = random_spec
    return BackboneDims(r.vocab_size, r.hidden_size, r.num_layers, r.intermediate_size or 4 * r.hidden_size,
                        r.num_heads, r.num_kv_heads or r.num_heads, r.family == "llama")


@dataclass
class Footprint:
    trainable_parameters: int
    largest_field: str  # the spec field that sizes the largest trainable part
    training_bytes: int  # weights, gradients and Adam's two moments, in fp32
    checkpoint_bytes: int  # weights and Adam's moments, as a checkpoint holds them
    backbone_cache_bytes: int  # the quantized backbone as the job's cache holds it

    def to_json(self) -> dict:
        return {"trainable_parameters": self.trainable_parameters, "largest_field": self.largest_field,
                "training_bytes": self.training_bytes, "checkpoint_bytes": self.checkpoint_bytes,
                "backbone_cache_bytes": self.backbone_cache_bytes}


def footprint(spec, dims: BackboneDims, compute_bytes: int) -> Footprint:
    """``compute_bytes``: the backbone's unquantized element size (2 for bf16/fp16, 4 for fp32)."""
    parts = trainable_parameters(spec.model, spec.data, dims.vocab, dims.hidden)
    total = sum(parts.values())
    layers = min(spec.model.llm_layers or dims.layers, dims.layers)
    kv = dims.hidden * dims.kv_heads // dims.heads
    per_layer = 2 * dims.hidden * dims.hidden + 2 * dims.hidden * kv \
        + (3 if dims.gated_mlp else 2) * dims.hidden * dims.intermediate
    weight_bytes = QUANTIZED_BYTES.get(spec.model.quantization, compute_bytes)
    backbone = int(layers * per_layer * weight_bytes + dims.vocab * dims.hidden * compute_bytes) \
        if spec.model.ablation == "none" else 0  # the LLM-free variants hold no backbone
    return Footprint(total, max(parts, key=parts.get), total * FP32 * 4, total * FP32 * 3, backbone)
