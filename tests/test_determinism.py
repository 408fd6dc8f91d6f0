"""``train.deterministic``: the settings a deterministic GPU run needs, applied before CUDA starts;
the platform recorded in every checkpoint; a resume on another platform said to continue "up to
float order" (the GPU proof itself needs a GPU: it is a separate issue). End to end, through
submit and status: tests/test_cli_e2e.py, the preemption on one machine resumed on another."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.cli import REPO
from tests.jobfiles import quick_spec
from timellm_job.jobs import load_spec, spec_hash
from timellm_job.trainer import determinism


def test_the_cublas_workspace_is_set_only_when_deterministic_and_a_users_value_is_kept():
    env: dict[str, str] = {}
    determinism.environment("auto", env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {}
    determinism.environment(False, env)
    assert env == {}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    determinism.environment(True, env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_the_trainer_sets_the_workspace_before_it_imports_torch(tmp_path):
    spec = quick_spec(tmp_path)
    code = """
import json, os, sys
from timellm_job.trainer import determinism
real = determinism.environment
seen = {}
def watched(setting, env=None):
    seen["torch imported"] = "torch" in sys.modules
    real(setting, env)
    seen["workspace"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
determinism.environment = watched
from timellm_job.trainer.__main__ import main
main(["check", sys.argv[1]])
print(json.dumps(seen))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", code, str(spec)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"torch imported": False, "workspace": ":4096:8"}


@pytest.fixture
def restored_flags():
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
    torch.backends.cuda.enable_flash_sdp(flags[4])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[5])
    torch.backends.cuda.enable_cudnn_sdp(flags[6])
    torch.backends.cuda.enable_math_sdp(flags[7])


def test_on_a_gpu_deterministic_kernels_and_math_attention_are_chosen_without_starting_cuda(restored_flags):
    determinism.apply("auto", "cuda")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert not torch.cuda.is_initialized()  # flags only: the first CUDA call is the model's
    determinism.apply(False, "cuda")  # torch's fastest kernels again
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


CPU = determinism.platform("auto", "cpu")
T4 = {**CPU, "device": "cuda", "card": "Tesla T4", "cuda": "12.4", "cudnn": 90100}


@pytest.mark.parametrize("recorded,now,said", [
    (CPU, CPU, "bit for bit"),
    (T4, T4, "bit for bit"),
    (T4, {**T4, "card": "NVIDIA L4"}, "up to float order (card Tesla T4 -> NVIDIA L4)"),
    (T4, {**T4, "torch": "9.9.9"}, f"up to float order (torch {CPU['torch']} -> 9.9.9)"),
    ({**T4, "deterministic": False}, T4, "up to float order (deterministic kernels off)"),
    (T4, {**T4, "deterministic": False}, "up to float order (deterministic kernels off)"),
    (None, CPU, "bit for bit"),  # written before platforms were recorded: every CPU run was deterministic
    (None, T4, "up to float order (platform not recorded)"),
])
def test_a_resume_says_whether_it_continues_bit_for_bit(recorded, now, said):
    assert determinism.exactness(recorded, now) == said


def test_the_platform_names_what_decides_the_kernels():
    assert CPU["device"] == "cpu" and CPU["card"] is None and CPU["torch"] == torch.__version__
    assert CPU["deterministic"] is True and determinism.platform(False, "cpu")["deterministic"] is False
    assert CPU["transformers"] and CPU["bitsandbytes"]


def test_auto_and_true_are_one_job_and_false_another(tmp_path):
    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    hashes = {}
    for value in (None, "auto", True, False):
        if value is not None:
            raw["train"]["deterministic"] = value
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
        hashes[value] = spec_hash(load_spec(tmp_path / "s.yaml"))
    assert hashes[None] == hashes["auto"] == hashes[True] != hashes[False]
