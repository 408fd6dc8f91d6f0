"""Shared helpers for the benchmarks: the machine's description, medians, the Llama-3-sized state."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

FAULTS = Path(__file__).resolve().parents[1] / "tests" / "faults"
TINY_SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "jobs" / "tiny-cpu.yaml"  # the demo's job


def with_faults(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the test-only fault injection (tests/faults) loaded by every child process:
    the TIMELLM_JOB_TEST_* variables act only then."""
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH")) if p)}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def drop_caches() -> bool:
    """Drop the page cache (root only) so reads come from the disk."""
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def median_time(fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(runs):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def llama3_trainable_state(vocab: int = 128_256, num_tokens: int = 1000, d_llm: int = 4096, d_model: int = 32,
                           d_ff: int = 128, n_heads: int = 8, patch_len: int = 16, n_patches: int = 64,
                           pred_len: int = 96):
    """Tensors shaped like Time-LLM's trainable parameters over Llama-3-8B (~142M parameters)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {
        "patch_embedding.value_embedding.tokenConv.weight": (d_model, patch_len, 3),
        "mapping_layer.weight": (num_tokens, vocab), "mapping_layer.bias": (num_tokens,),
        "reprogramming_layer.query_projection.weight": (d_ff * n_heads, d_model),
        "reprogramming_layer.query_projection.bias": (d_ff * n_heads,),
        "reprogramming_layer.key_projection.weight": (d_ff * n_heads, d_llm),
        "reprogramming_layer.key_projection.bias": (d_ff * n_heads,),
        "reprogramming_layer.value_projection.weight": (d_ff * n_heads, d_llm),
        "reprogramming_layer.value_projection.bias": (d_ff * n_heads,),
        "reprogramming_layer.out_projection.weight": (d_llm, d_ff * n_heads),
        "reprogramming_layer.out_projection.bias": (d_llm,),
        "output_projection.linear.weight": (pred_len, d_ff * n_patches),
        "output_projection.linear.bias": (pred_len,),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}
