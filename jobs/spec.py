"""The job spec: what a user writes in job.yaml, validated once.

Invariants:
- Unknown fields are refused at every level; types and ranges are checked by pydantic.
- Every error is reported as ``section.field: message`` (see :class:`SpecError`), never a traceback.
- Reading a spec from its file (paths, ``--set``, errors, YAML without aliases) is
  jobs.spec_files; this module is the schema.
- Nothing here touches the network, the storage or torch: checks that need them (data length,
  device, a hub backbone) belong to the trainer's pre-flight check.
- What makes two specs the same job (the training sections, the spec hash) is jobs.identity.
- Every size has an upper bound a machine can hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (fullmatch): no trailing newline
NAME_RULE = ("must be 1-128 letters, digits, '.', '_' or '-', start with a letter or digit, "
             "and contain no '..' (it names a folder under the storage root)")


def safe_name(name: str) -> bool:
    """The one job-name rule (the spec's and the storage layout's): a folder under the root."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


class SpecError(ValueError):
    """A job spec that cannot be accepted; ``str()`` is one line per field, each naming it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSpec(_Section):
    root: str = Field(min_length=1)
    save_steps: int = Field(default=500, ge=1)
    save_total_limit: int = Field(default=3, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    # a store that cannot write an object only if absent is refused unless the user opts in to a
    # single writer they guarantee themselves (status flags it)
    unsafe_single_writer: bool = False


class DataSpec(_Section):
    path: str = Field(min_length=1)
    kind: Literal["ETTh1", "ETTh2", "ETTm1", "ETTm2", "custom"] = "ETTh1"
    features: Literal["M", "S", "MS"] = "M"
    target: str = "OT"
    date_column: str = "date"
    seq_len: int = Field(default=512, ge=1, le=100_000)
    label_len: int = Field(default=48, ge=0)
    pred_len: int = Field(default=96, ge=1, le=100_000)
    percent: int = Field(default=100, ge=1, le=100)

    @model_validator(mode="after")
    def _label_within_window(self) -> DataSpec:
        if self.label_len > self.seq_len:
            raise ValueError(f"label_len ({self.label_len}) must not exceed seq_len ({self.seq_len})")
        return self


class RandomBackbone(_Section):
    family: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = Field(ge=8, le=16384)
    num_layers: int = Field(ge=1, le=256)
    num_heads: int = Field(ge=1, le=256)
    num_kv_heads: int | None = Field(default=None, ge=1, le=256)
    intermediate_size: int | None = Field(default=None, ge=1)
    vocab_size: int = Field(default=512, ge=300, le=1_000_000)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> RandomBackbone:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


class BackboneSpec(_Section):
    pretrained: str | None = None
    revision: str | None = None
    random: RandomBackbone | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BackboneSpec:
        if (self.pretrained is None) == (self.random is None):
            raise ValueError("give exactly one of 'pretrained' (a hub id or a local directory) or 'random'")
        return self

    def depth(self) -> int | None:
        """Layers of the backbone, when knowable without downloading anything."""
        if self.random is not None:
            return self.random.num_layers
        config = Path(self.pretrained or "") / "config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text())
            except (OSError, ValueError):
                return None
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(cfg.get(key), int):
                    return cfg[key]
        return None


class ModelSpec(_Section):
    backbone: BackboneSpec
    llm_layers: int | None = Field(default=None, ge=1, le=1024)
    quantization: Literal["nf4", "int8", "none"] = "none"
    # upper bounds far above the paper's settings (d_model 16/32, d_ff 32/128, 8 heads, 1000
    # tokens) and below what would not fit any machine; pre-flight checks what fits this one
    d_model: int = Field(default=32, ge=1, le=8192)
    d_ff: int = Field(default=128, ge=1, le=16384)
    n_heads: int = Field(default=8, ge=1, le=256)
    patch_len: int = Field(default=16, ge=1, le=100_000)
    stride: int = Field(default=8, ge=1, le=100_000)
    num_tokens: int = Field(default=1000, ge=1, le=1_000_000)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    description: str | None = None
    # the backbone's compute dtype (bitsandbytes' compute dtype and its activations; the trainable
    # layers stay fp32). auto: bf16 on a GPU with native bf16 (compute capability >= 8.0), fp16
    # on older GPUs (T4, V100; with dynamic loss scaling), fp32 on a CPU.
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # the LLM-free variants of Time-LLM (Tan et al., NeurIPS 2024): the frozen LLM removed
    # (no_llm), or replaced by one randomly initialised multi-head attention layer (attention)
    # or transformer block (transformer), trained with the rest
    ablation: Literal["none", "no_llm", "attention", "transformer"] = "none"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.ablation in ("attention", "transformer") and self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} heads must divide d_model ({self.d_model}) for "
                             f"ablation {self.ablation}")
        return self

    @model_validator(mode="after")
    def _layers_exist(self) -> ModelSpec:
        depth = self.backbone.depth()
        if self.llm_layers is not None and depth is not None and self.llm_layers > depth:
            raise ValueError(f"llm_layers: {self.llm_layers} exceeds the backbone's {depth} layers")
        return self


class TrainSpec(_Section):
    epochs: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=24, ge=1, le=1_000_000)
    eval_batch_size: int = Field(default=8, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.001, gt=0.0, le=10.0)
    patience: int = Field(default=10, ge=1)
    seed: int = Field(default=2021, ge=0, lt=2**32)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # processes under torchrun (DDP; one per GPU, gloo on CPU). batch_size is the global batch:
    # each process trains on batch_size / nproc samples of it.
    nproc: int = Field(default=1, ge=1, le=64)
    # samples per forward/backward pass in each process; gradients of the micro-batches of a
    # batch are accumulated into one optimizer step. None: the whole batch; auto: planned on
    # the card once (trainer.memory) and reused by every resume on it.
    micro_batch_size: int | Literal["auto"] | None = Field(default=None)
    # recompute the frozen backbone's activations in the backward pass (non-reentrant).
    # auto: on for GPUs with less than 40 GiB.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # deterministic kernels and every device's RNG state in checkpoints (trainer.determinism):
    # a resume on the same card and software continues bit for bit. auto: true. false: torch's
    # fastest kernels (a GPU run then differs in the last bits from run to run).
    deterministic: bool | Literal["auto"] = "auto"

    @field_validator("micro_batch_size")
    @classmethod
    def _micro_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of samples, or auto")
        return v


class PreemptionNotice(_Section):
    """Opt-in watcher of a cloud metadata endpoint announcing a preemption."""

    provider: Literal["gce", "aws", "azure"]
    url: str | None = None  # defaults to the provider's documented metadata URL
    interval_s: float = Field(default=5.0, gt=0.0)


class RunSpec(_Section):
    max_restarts: int = Field(default=10, ge=0)
    heartbeat_timeout_s: float = Field(default=600.0, gt=0.0)
    grace_period_s: float = Field(default=25.0, gt=0.0)
    backoff_initial_s: float = Field(default=0.5, ge=0.0)
    backoff_max_s: float = Field(default=60.0, ge=0.0)
    crash_loop_limit: int = Field(default=3, ge=2)
    preemption_notice: PreemptionNotice | None = None
    backbone_cache: bool = True
    # a trainer that has done its imports waits for the next attempt (orchestrator.spare)
    warm_spare: bool = True
    # a word when a runtime dies: webhooks told of every phase change, and a dead-man's switch
    # (healthchecks.io's convention) pinged while the job runs; secrets, redacted when stored
    notify: list[str] = Field(default_factory=list)
    healthcheck_url: str | None = None
    healthcheck_every_s: float = Field(default=60.0, gt=0.0)

    @field_validator("notify")
    @classmethod
    def _webhooks(cls, v: list[str]) -> list[str]:
        for url in v:
            _http_url(url)
        return v

    @field_validator("healthcheck_url")
    @classmethod
    def _healthcheck(cls, v: str | None) -> str | None:
        return v if v is None else _http_url(v).rstrip("/")


def _http_url(url: str) -> str:
    if not re.match(r"^https?://[^/?#\s]+", url or ""):
        raise ValueError(f"{url!r} is not an http(s) URL")
    return url


class JobSpec(_Section):
    name: str
    storage: StorageSpec
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not safe_name(v):
            raise ValueError(NAME_RULE)
        return v

    @model_validator(mode="after")
    def _cross_fields(self) -> JobSpec:
        problems = []
        if self.model.patch_len > self.data.seq_len:
            problems.append(f"model.patch_len: {self.model.patch_len} exceeds data.seq_len ({self.data.seq_len})")
        if self.model.d_ff > 0 and self.model.backbone.random is not None \
                and self.model.d_ff > self.model.backbone.random.hidden_size:
            problems.append(f"model.d_ff: {self.model.d_ff} exceeds the backbone width "
                            f"({self.model.backbone.random.hidden_size})")
        if self.model.quantization != "none" and self.model.backbone.random is not None \
                and self.model.backbone.random.family == "gpt2":
            problems.append("model.quantization: bitsandbytes cannot quantize GPT-2's Conv1D layers; use none")
        if self.train.batch_size % self.train.nproc:
            problems.append(f"train.batch_size: {self.train.batch_size} does not split evenly across "
                            f"train.nproc ({self.train.nproc}) processes")
        micro = self.train.micro_batch_size
        per_process = self.train.batch_size // self.train.nproc
        if isinstance(micro, int) and per_process % micro:
            where = f"the {per_process} samples each of train.nproc ({self.train.nproc}) processes takes of " \
                if self.train.nproc > 1 else ""
            problems.append(f"train.micro_batch_size: {micro} does not divide {where}train.batch_size "
                            f"({self.train.batch_size}); use a divisor, or auto")
        if problems:
            raise SpecError(problems)
        return self


def model_variant(model: Any) -> str:
    """What a job trains, from its model section (a ``ModelSpec`` or a stored spec's mapping):
    Time-LLM, or an LLM-free variant (``model.ablation``)."""
    ablation = model.get("ablation") if isinstance(model, dict) else getattr(model, "ablation", None)
    return f"LLM-free: {ablation}" if ablation and ablation != "none" else "Time-LLM"


def data_storage_options(spec: JobSpec) -> dict | None:
    """``storage.options`` apply to ``data.path`` when both are on the same kind of store."""
    def scheme(url: str) -> str:
        return url.split("://", 1)[0] if "://" in url else "file"

    return spec.storage.options if scheme(spec.data.path) == scheme(spec.storage.root) != "file" else None
