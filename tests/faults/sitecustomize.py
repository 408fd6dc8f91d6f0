"""Test-only fault injection for the processes that tests and benchmarks start.

This folder is put on ``PYTHONPATH`` by tests/conftest.py (and by the benchmarks that inject
faults), never by the product: Python imports this module at start-up, and it patches the
product's modules as they are imported. Nothing in the product reads these variables.

- ``TIMELLM_JOB_TEST_STEP_DELAY_S``: sleep after each training step (so kills land mid-run).
- ``TIMELLM_JOB_TEST_FAIL_AT_STEP``: raise at that training step (a crash).
- ``TIMELLM_JOB_TEST_EVAL_DELAY_S``: sleep after each validation or test batch.
- ``TIMELLM_JOB_TEST_WRITE_DELAY_S``: sleep after each file a checkpoint commit writes (so kills
  land inside a checkpoint write).
- ``TIMELLM_TEST_OOM_ABOVE_MICRO``: a training forward pass of more than N samples raises
  torch.OutOfMemoryError, as CUDA does when a micro-batch does not fit.
- ``TIMELLM_TEST_CUDA_MEMORY_GIB``: ``trainer run`` may use only that much GPU memory
  (``torch.cuda.set_per_process_memory_fraction``): a T4's or an L4's memory on a bigger card.
- ``TIMELLM_TEST_BNB_NO_CPU_NF4``: bitsandbytes cannot quantize NF4 on a CPU, as 0.45 could not
  (it installs and imports, then fails at the first quantization).
- ``TIMELLM_TEST_HOST_ALLOC_MB``: ``trainer run`` touches that much host memory as it starts (a
  real allocation, for the kernel's OOM killer under a memory-limited cgroup).
- ``TIMELLM_TEST_PERTURB_SAVES``: every checkpoint this process writes holds other bytes than the
  same checkpoint of an unperturbed run (its trainer_state.json names this process): two writers
  of one id differ, as they do on a GPU, where a scribble into another's checkpoint shows.
- ``TIMELLM_TEST_CLOCK_OFFSET_S``: this process's wall clock (time.time) runs that many seconds
  ahead (negative: behind); its monotonic clock is untouched: a host whose clock is off.
- ``TIMELLM_TEST_PLATFORM``: a JSON object over what trainer.determinism.platform reports (a
  card model, a version): this process trains "on another platform" than the next one.
- The test-only fsspec filesystems ``faulty://`` and ``faultymem://`` (tests/faults/faultyfs.py)
  are registered in every process, with the faults of ``TIMELLM_TEST_FAULT_PLAN``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import time


def _env(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _patch_loop(module) -> None:
    fail_at, delay = int(_env("TIMELLM_JOB_TEST_FAIL_AT_STEP")), _env("TIMELLM_JOB_TEST_STEP_DELAY_S")
    eval_delay = _env("TIMELLM_JOB_TEST_EVAL_DELAY_S")
    megabytes = int(_env("TIMELLM_TEST_HOST_ALLOC_MB"))
    if megabytes:
        module._test_ballast = b"\x01" * (megabytes << 20)
    cap = _env("TIMELLM_TEST_CUDA_MEMORY_GIB")
    if cap and module.torch.cuda.is_available():
        total = module.torch.cuda.get_device_properties(0).total_memory
        module.torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
    if not (fail_at or delay or eval_delay):
        return
    writer = sys.modules["timellm_job.trainer.reporting"].HeartbeatWriter  # imported by the loop before it
    beat = writer.beat

    def stepping_beat(self, force=False, **fields):
        beat(self, force, **fields)
        if "loss" in fields and "step" in fields:  # the beat of a finished training step
            if fail_at and fields["step"] == fail_at:
                raise RuntimeError(f"test-only failure injected at step {fields['step']}")
            if delay:
                time.sleep(delay)
        if "eval_batch" in fields and eval_delay:  # the beat of a validation or test batch
            time.sleep(eval_delay)

    writer.beat = stepping_beat


def _patch_model(module) -> None:
    limit = int(_env("TIMELLM_TEST_OOM_ABOVE_MICRO"))
    if not limit:
        return
    import torch

    forward = module.TimeLLM.forward

    def forward_that_runs_out(self, x):
        if torch.is_grad_enabled() and x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test-only: {x.shape[0]} samples > {limit})")
        return forward(self, x)

    module.TimeLLM.forward = forward_that_runs_out


def _patch_state(module) -> None:
    if not _env("TIMELLM_TEST_PERTURB_SAVES"):
        return
    to_files = module.Snapshot.to_files

    def perturbed(self):
        files = to_files(self)
        doc = json.loads(files[module.STATE_FILE])
        doc["test_perturbed_by"] = os.getpid()
        files[module.STATE_FILE] = json.dumps(doc, sort_keys=True).encode()
        return files

    module.Snapshot.to_files = perturbed


def _patch_store(module) -> None:
    delay = _env("TIMELLM_JOB_TEST_WRITE_DELAY_S")
    if not delay:
        return
    write_file = module.Store.write_file

    def slow_write_file(self, path, *args, **kwargs):
        out = write_file(self, path, *args, **kwargs)
        if not path.endswith("manifest.json"):
            time.sleep(delay)
        return out

    module.Store.write_file = slow_write_file


def _patch_bnb(module) -> None:
    if not _env("TIMELLM_TEST_BNB_NO_CPU_NF4"):
        return
    quantize_4bit = module.quantize_4bit

    def no_cpu(A, *args, **kwargs):
        if A.device.type == "cpu" and kwargs.get("quant_type", "fp4") == "nf4":
            raise NotImplementedError("test-only: this bitsandbytes has no CPU implementation of quantize_4bit")
        return quantize_4bit(A, *args, **kwargs)

    module.quantize_4bit = no_cpu


def _patch_determinism(module) -> None:
    override = json.loads(os.environ.get("TIMELLM_TEST_PLATFORM") or "{}")
    if not override:
        return
    real = module.platform
    module.platform = lambda setting, device: {**real(setting, device), **override}


PATCHES = {"timellm_job.trainer.determinism": _patch_determinism, "bitsandbytes.functional": _patch_bnb, "timellm_job.trainer.loop": _patch_loop, "timellm_job.trainer.model.timellm": _patch_model,
           "timellm_job.storage.store": _patch_store, "timellm_job.trainer.checkpoint_state": _patch_state}


class _Finder:
    """Finds the product's module as usual and patches it once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())

_offset = _env("TIMELLM_TEST_CLOCK_OFFSET_S")
if _offset:
    _real_time = time.time
    time.time = lambda: _real_time() + _offset  # noqa: E731 - the whole process sees a skewed clock

if os.environ.get("TIMELLM_TEST_FAULT_PLAN") or os.environ.get("TIMELLM_TEST_FAULTYFS"):
    import faultyfs  # noqa: F401  (registers faulty:// and faultymem://)
