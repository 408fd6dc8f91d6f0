"""A model hub that does not answer is an outage, not bad input: hub calls are retried with
backoff, an outage that passes costs only time, one that lasts ends in HubUnreachable (exit 1,
never 2), and a repo that does not exist is bad input before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.cli import run
from tests.hub_server import HubServer
from tests.jobfiles import quick_spec

REPO = Path(__file__).resolve().parents[1]
LOAD = """
import sys
from timellm_job.jobs.spec import ModelSpec
from timellm_job.trainer.backbone import BackboneError, HubUnreachable, load_backbone
try:
    b = load_backbone(ModelSpec.model_validate_json(sys.argv[1]), "cpu")
    print("loaded", b.source)
except HubUnreachable as exc:
    print("unreachable", exc)
except BackboneError as exc:
    print("bad input", exc)
"""


def _stand_in(tmp_path) -> Path:
    from timellm_job.jobs.spec import RandomBackbone
    from timellm_job.trainer.backbone import build_random_weights, random_tokenizer

    r = RandomBackbone.model_validate({"family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4})
    folder = tmp_path / "repo"
    build_random_weights(r, 2).save_pretrained(folder)
    random_tokenizer(r.vocab_size, r.family).save_pretrained(folder)
    return folder


def _load(tmp_path, endpoint: str, repo: str, **env) -> str:
    from timellm_job.jobs.spec import ModelSpec

    ms = ModelSpec.model_validate({"backbone": {"pretrained": repo}, "quantization": "none", "d_model": 8, "d_ff": 16,
                                   "n_heads": 2, "num_tokens": 10})
    out = subprocess.run([sys.executable, "-c", LOAD, ms.model_dump_json()], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
                                           "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_an_outage_that_passes_is_retried_and_one_that_lasts_is_not_bad_input(tmp_path):
    hub = HubServer({"stand-in/llama": _stand_in(tmp_path)}).start()
    try:
        hub.failing = 2  # (huggingface_hub retries a 503 itself, after 1 s, then 2 s: then ours)
        assert _load(tmp_path, hub.endpoint, "stand-in/llama", TIMELLM_JOB_HUB_RETRY_S="120") == "loaded pretrained:stand-in/llama"
        assert hub.failing == 0  # every 503 was answered, then the download went through
        hub.failing = 10**9
        said = _load(tmp_path / "again", hub.endpoint, "stand-in/llama", TIMELLM_JOB_HUB_RETRY_S="3")
        assert said.startswith("unreachable model.backbone.pretrained: the hub did not answer for 'stand-in/llama'")
        assert "not bad input" in said
        hub.failing = 0
        said = _load(tmp_path / "third", hub.endpoint, "stand-in/no-such-repo", TIMELLM_JOB_HUB_RETRY_S="120")
        assert said.startswith("bad input model.backbone.pretrained: cannot load 'stand-in/no-such-repo'")
    finally:
        hub.stop()


def test_preflight_refuses_a_repo_that_does_not_exist_before_writing_anything(tmp_path):
    """(An outage at pre-flight is only a warning: hub_problems catches HubUnreachable; the run
    retries. Not run here: huggingface_hub alone spends 23 s on a refused connection.)"""
    hub = HubServer({"stand-in/llama": _stand_in(tmp_path)}).start()
    try:
        spec = quick_spec(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")}
        missing = run(tmp_path, "submit", str(spec), "--set", "model.backbone.pretrained=stand-in/no-such-repo",
                      "--set", "model.backbone.random=null", timeout=300, **env)
        assert missing.returncode == 2, missing.stderr
        assert "model.backbone.pretrained: cannot load 'stand-in/no-such-repo'" in missing.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    finally:
        hub.stop()
