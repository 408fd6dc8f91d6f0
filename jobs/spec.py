"""The job spec: what a user writes in job.yaml, validated once.

Invariants:
- Unknown fields are refused at every level; types and ranges are checked by pydantic.
- Every error is reported as ``section.field: message`` (see :class:`SpecError`), never a traceback.
- Relative paths (``storage.root``, ``data.path``, a local ``backbone.pretrained``) are resolved
  against the folder of the spec file, unless they are URLs (``scheme://``); a ``--root`` given
  on the command line resolves against the current directory, as a shell user expects.
- Nothing here touches the network, the storage or torch: checks that need them (data length,
  device, a hub backbone) belong to the trainer's pre-flight check.
- What makes two specs the same job (the training sections, the spec hash) is jobs.identity.
- YAML aliases and anchors are refused (a few hundred bytes can expand to gigabytes), and every
  size has an upper bound a machine can hold.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base: Path) -> str:
    if _is_url(path) or os.path.isabs(path):
        return path
    return str((base / path).resolve())


def _format_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if isinstance(e.get("ctx", {}).get("error"), SpecError):
            problems.extend(e["ctx"]["error"].problems)
            continue
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier() and loc:  # a section's check that names its field: section.field
            loc, msg = f"{loc}.{field}", rest
        problems.append(f"{loc}: {msg}" if loc else msg)
    return problems


def _apply_set(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise SpecError([f"--set {assignment}: expected section.key=value"])
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError([f"{key}: cannot set a field inside a {type(child).__name__}"])
        node = child
    node[parts[-1]] = parsed


def parse_spec(raw: Any, base_dir: Path, root: str | None = None, sets: tuple[str, ...] = ()) -> JobSpec:
    """Validate a spec mapping; ``root`` and ``sets`` override fields, paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise SpecError([f"the spec must be a mapping of sections, not {type(raw).__name__}"])
    raw = json.loads(json.dumps(raw, default=str))  # a private deep copy
    for assignment in sets:
        _apply_set(raw, assignment)
    if root is not None:
        root = root if _is_url(root) else os.path.abspath(os.path.expanduser(root))  # relative to the shell
        raw.setdefault("storage", {})
        if not isinstance(raw["storage"], dict):
            raise SpecError(["storage: must be a mapping"])
        raw["storage"]["root"] = root
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(err)) from None
    except SpecError:
        raise
    spec.storage.root = _resolve(spec.storage.root, base_dir)
    spec.data.path = _resolve(spec.data.path, base_dir)
    pre = spec.model.backbone.pretrained
    if pre is not None and (pre.startswith((".", "/", "~")) or (base_dir / pre).exists()):
        spec.model.backbone.pretrained = _resolve(os.path.expanduser(pre), base_dir)
        if not Path(spec.model.backbone.pretrained).is_dir():
            raise SpecError([f"model.backbone.pretrained: no such directory: {spec.model.backbone.pretrained}"])
    # re-run the cross-section checks that depend on resolved paths (a local backbone's depth)
    try:
        ModelSpec.model_validate(spec.model.model_dump())
    except ValidationError as err:
        raise SpecError([f"model.{p}" for p in _format_error(err)]) from None
    return spec


def load_spec(path: str | Path, root: str | None = None, sets: tuple[str, ...] = ()) -> JobSpec:
    """Read and validate a job.yaml; raises :class:`SpecError` naming each bad field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read: {exc}"]) from None
    try:
        raw = safe_load_no_aliases(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_spec(raw, path.resolve().parent, root=root, sets=sets)


class _NoAliasLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing aliases: a job spec never needs one, and a few hundred bytes of
    nested aliases expand into gigabytes (a 'billion laughs')."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a job spec; "
                                              "write the value out", event.start_mark)
        return super().compose_node(parent, index)


def safe_load_no_aliases(text: str) -> Any:
    """``yaml.safe_load`` without aliases (see :class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
