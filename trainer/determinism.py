"""Deterministic kernels (``train.deterministic``) and the platform a checkpoint was trained on.

A resume continues bit for bit only where every kernel is deterministic and the kernels are the
same: the same card model and the same software. On a CPU our kernels are deterministic anyway;
on a GPU this module makes them so (cuBLAS's fixed workspace, cuDNN's deterministic algorithms,
an attention whose backward pass adds in a fixed order) and records, in every checkpoint, what
they were. A resume compares the two and says which promise holds.

Invariants:
- ``CUBLAS_WORKSPACE_CONFIG`` is in the environment before CUDA initialises: the trainer's entry
  sets it (``environment``) before it imports torch; a value the user set is kept.
- ``apply`` runs before the first kernel: deterministic algorithms (an operation that has no
  deterministic implementation warns), cuDNN deterministic and not benchmarking, and scaled
  dot-product attention on its math backend (the flash, memory-efficient and cuDNN backends add
  in the backward pass in an order that varies). ``false`` leaves torch's fastest kernels.
- ``platform`` is what decides the kernels: device type, card model, torch, CUDA, cuDNN,
  transformers and bitsandbytes versions, and the setting itself. ``exactness`` of a resume is
  "bit for bit" when the checkpoint's platform is this one and determinism was on for both, else
  "up to float order" with what differs. A checkpoint written before platforms were recorded
  says nothing: its resume is "up to float order (platform not recorded)" on a GPU, "bit for
  bit" on a CPU (where every earlier version was deterministic).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

CUBLAS_WORKSPACE = ":4096:8"  # the setting NVIDIA documents for deterministic cuBLAS
BIT_FOR_BIT = "bit for bit"
UP_TO_FLOAT_ORDER = "up to float order"


def enabled(setting: bool | str) -> bool:
    """``train.deterministic``: auto means on."""
    return setting is True or setting == "auto"


def environment(setting: bool | str, env: dict[str, str] | None = None) -> None:
    """Before torch is imported: the cuBLAS workspace a deterministic run needs."""
    env = os.environ if env is None else env
    if enabled(setting):
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def apply(setting: bool | str, device: str) -> None:
    import torch

    on = enabled(setting)
    torch.use_deterministic_algorithms(on, warn_only=True)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = on
        torch.backends.cudnn.benchmark = not on
        for backend in ("flash", "mem_efficient", "cudnn"):
            switch = getattr(torch.backends.cuda, f"enable_{backend}_sdp", None)
            if switch is not None:
                switch(not on)
        torch.backends.cuda.enable_math_sdp(True)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def platform(setting: bool | str, device: str) -> dict[str, Any]:
    import torch

    kind = torch.device(device).type
    cuda = kind == "cuda"
    return {"device": kind,
            "card": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": _version("transformers"),
            "bitsandbytes": _version("bitsandbytes"),
            "deterministic": enabled(setting)}


def exactness(recorded: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """How a resume from a checkpoint trained on ``recorded`` continues here."""
    if recorded is None:
        return BIT_FOR_BIT if now["device"] == "cpu" and now["deterministic"] \
            else f"{UP_TO_FLOAT_ORDER} (platform not recorded)"
    differs = [f"{key} {recorded.get(key)} -> {now[key]}" for key in now
               if key != "deterministic" and recorded.get(key) != now[key]]
    if not (recorded.get("deterministic") and now["deterministic"]):
        differs.append("deterministic kernels off")
    return BIT_FOR_BIT if not differs else f"{UP_TO_FLOAT_ORDER} ({'; '.join(differs)})"
