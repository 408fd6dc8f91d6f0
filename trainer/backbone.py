"""The frozen LLM backbone: loaded (a hub id or a local folder) or built at random, truncated to
``llm_layers``, quantized by bitsandbytes, with its tokenizer.

Invariants:
- ``llm_layers`` deeper than the backbone is a :class:`BackboneError` (never random extra layers).
- A random backbone is a pure function of its spec (seeded, no download); its tokenizer is
  built locally from a fixed word list, so prompts tokenize the same everywhere.
- Quantization goes through transformers' BitsAndBytesConfig: nf4 with double quantization,
  int8 through LLM.int8. The compute dtype (bitsandbytes' and the dtype of every weight left
  unquantized, hence of the activations) is ``model.compute_dtype`` resolved for the device by
  trainer.memory: by default bf16 on a GPU with native bf16, fp16 on older GPUs, fp32 on CPU.
- Every backbone parameter is frozen (requires_grad False) and the module is in eval mode.
- The global RNG is left untouched (random weights come from a forked RNG).
- A hub that does not answer (refused or dropped connections, timeouts, 429/5xx) is transient:
  every hub call is retried with backoff for ``TIMELLM_JOB_HUB_RETRY_S`` (600 s) and then raises
  :class:`HubUnreachable`, never BackboneError: an outage is not bad input. A repo, revision or
  file that does not exist, or a gated repo without a token, is BackboneError at once.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from timellm_job.jobs.messages import first_line
from timellm_job.storage.retry import is_transient


class BackboneError(ValueError):
    """A backbone that cannot be built as specified; the message names the field."""


class HubUnreachable(RuntimeError):
    """The model hub did not answer for HUB_RETRY_S: transient (run again later), not bad input."""


HUB_RETRY_S = float(os.environ.get("TIMELLM_JOB_HUB_RETRY_S", "600"))
def hub_cache_bytes(name: str) -> int:
    """Bytes of the hub repo ``name`` in the local Hugging Face cache, partial downloads included
    (what a download has reached so far)."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + name.replace("/", "--"), "blobs")
    total = 0
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    return total


def from_hub(call, name: str, within_s: float | None = None):
    """``call()`` (a hub download), retried with backoff while the hub does not answer."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

    limit = HUB_RETRY_S if within_s is None else within_s
    try:
        return Retrying(retry=retry_if_exception(is_transient), wait=wait_random_exponential(multiplier=1, max=30),
                        stop=stop_after_delay(limit), reraise=True)(call)
    except Exception as exc:
        if not is_transient(exc):
            raise
        cause = first_line(exc, 200)
        raise HubUnreachable(f"model.backbone.pretrained: the hub did not answer for {name!r} within {limit:.0f} s "
                             f"({cause}); an outage is not bad input: nothing is wrong with the job, run it again "
                             f"when the hub answers") from None


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    width: int
    depth: int
    dtype: torch.dtype
    source: str  # "random", "pretrained:<id>" or "cache:<url>"

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight


# Words of the prompt template and dataset descriptions, for the random backbone's tokenizer.
_WORDS = ("dataset description task forecast the next steps given previous information input "
          "statistics min max median value values trend of is upward downward top lags are "
          "electricity transformer temperature ett oil load hourly minute minutes data series "
          "time a an and in to from for with by on at this that which two years counties china "
          "power grid six features target months train validation test split measured recorded "
          "readings sensor custom numeric columns each step hour record records beside over "
          "date column").split()
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|start_prompt|>", "<|end_prompt|>"]


def random_tokenizer(vocab_size: int, family: str = "llama"):
    """A word-level tokenizer over a fixed vocabulary: digits, punctuation, the prompt's words.
    Special tokens as the family's own tokenizer adds them: LLaMA's prompts start with BOS
    (``<s>``), GPT-2's with nothing."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_list = _SPECIALS + [str(d) for d in range(10)] + list(".,:;-+%()'\"[]/=_!?") + _WORDS
    vocab_list = list(dict.fromkeys(vocab_list))
    if len(vocab_list) > vocab_size:
        raise BackboneError(f"model.backbone.random.vocab_size: must be at least {len(vocab_list)}")
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab_list)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True)])
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab_list.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=_SPECIALS[4:])


def quantization_config(quantization: str, compute: torch.dtype):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def compute_dtype_of(model_spec, device: str) -> torch.dtype:
    """The backbone's compute dtype on ``device``: ``model.compute_dtype`` resolved for its card."""
    from timellm_job.trainer.memory import DTYPES, card_of, compute_dtype

    return DTYPES[compute_dtype(model_spec.compute_dtype, card_of(device))]


def _random_config(r, layers: int):
    from transformers import GPT2Config, LlamaConfig

    if r.family == "llama":
        return LlamaConfig(hidden_size=r.hidden_size, num_hidden_layers=layers, num_attention_heads=r.num_heads,
                           num_key_value_heads=r.num_kv_heads or r.num_heads,
                           intermediate_size=r.intermediate_size or 2 * r.hidden_size,
                           vocab_size=r.vocab_size, max_position_embeddings=4096, tie_word_embeddings=False)
    return GPT2Config(n_embd=r.hidden_size, n_layer=layers, n_head=r.num_heads, vocab_size=r.vocab_size,
                      n_positions=4096, n_inner=r.intermediate_size)


def build_random_weights(r, layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A seeded random backbone module (no quantization), built on ``device`` in ``dtype`` (an
    8B-parameter model is initialised on the GPU in seconds, on a CPU in minutes); the global RNG
    is left untouched."""
    from transformers import AutoModel

    config = _random_config(r, layers)
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(r.seed)
        model = AutoModel.from_config(config, dtype=dtype)
    return model


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _depth(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise BackboneError("model.backbone: cannot tell the backbone's depth from its config")


def load_backbone(model_spec, device: str) -> Backbone:
    """Build the frozen backbone of a ModelSpec on ``device`` ("cpu" or "cuda")."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    on_gpu = device.startswith("cuda")
    dtype = compute_dtype_of(model_spec, device)
    quant = quantization_config(model_spec.quantization, dtype)
    spec = model_spec.backbone
    if spec.random is not None:
        depth = spec.random.num_layers
        layers = model_spec.llm_layers or depth
        if layers > depth:
            raise BackboneError(f"model.llm_layers: {layers} exceeds the backbone's {depth} layers")
        model = build_random_weights(spec.random, layers, device, dtype)
        tokenizer = random_tokenizer(spec.random.vocab_size, spec.random.family)
        if quant is not None:  # bitsandbytes quantizes at load time: go through a local folder
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                del model
                if on_gpu:
                    torch.cuda.empty_cache()
                model = AutoModel.from_pretrained(folder, quantization_config=quant, device_map=device,
                                                  dtype=dtype)
        source = "random"
    else:
        name = spec.pretrained
        try:
            config = from_hub(lambda: AutoConfig.from_pretrained(name, revision=spec.revision), name)
        except (OSError, ValueError) as exc:
            cause = first_line(exc)
            raise BackboneError(f"model.backbone.pretrained: cannot load {name!r}: {cause}") from None
        depth = _depth(config)
        layers = model_spec.llm_layers or depth
        if layers > depth:
            raise BackboneError(f"model.llm_layers: {layers} exceeds the backbone's {depth} layers")
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key):
                setattr(config, key, layers)
        kwargs = {"quantization_config": quant, "device_map": device} if quant else {}
        model = from_hub(lambda: AutoModel.from_pretrained(name, revision=spec.revision, config=config, dtype=dtype,
                                                           **kwargs), name)
        if quant is None:
            model = model.to(device)
        tokenizer = from_hub(lambda: AutoTokenizer.from_pretrained(name, revision=spec.revision), name)
        source = f"pretrained:{name}"
    return finish(model, tokenizer, model_spec, layers, source)


def finish(model, tokenizer, model_spec, layers: int, source: str) -> Backbone:
    """Freeze the model, pad prompts on the left, check d_ff against the width."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    width = model.get_input_embeddings().weight.shape[1]
    if model_spec.d_ff > width:
        raise BackboneError(f"model.d_ff: {model_spec.d_ff} exceeds the backbone width ({width})")
    emb_dtype = model.get_input_embeddings().weight.dtype
    return Backbone(_freeze(model), tokenizer, width, layers, emb_dtype, source)


def default_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackboneError("train.device: cuda was asked for, but this machine has no CUDA device "
                            "(use device: cpu or auto)")
    return requested


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
