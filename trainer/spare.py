"""A warm spare: a trainer process that does its imports before its attempt starts, then waits.

``python -m timellm_job.trainer spare --deterministic auto|true|false [--preload BACKBONE]``

Most of a trainer's start-up is imports (torch, the loop, transformers' model classes); a spare
does them ahead of time, and the attempt that claims it starts at building its model.

Invariants:
- Before torch is imported the environment is a cold trainer's: its orchestrator started it
  with the attempt's environment (all but the heartbeat path), and the cuBLAS workspace is set
  here from the job's ``train.deterministic`` (determinism.environment), as a cold start does.
- It imports what a trainer imports before its first step, on its main thread; the model class
  of ``--preload`` (a backbone family, or a hub id or folder whose config is on this machine:
  nothing is downloaded) is looked up without building anything. Nothing initialises CUDA.
- Then it reads one line from standard input, its claim (jobs.protocol.SpareClaim): the
  arguments of ``python -m timellm_job.trainer`` for the attempt, the variables only the attempt
  knows (its heartbeat path), and the attempt's log. What the imports
  printed (kept in the unlinked file its output went to) is copied to the log, which becomes its
  output. From there it runs the trainer's ``main`` with those arguments, exactly as a cold
  start: it trains bit for bit as one.
- End of input (its orchestrator discarded it, or died) ends it, exit 0, having written nothing
  that lasts. It is the orchestrator's to kill (orchestrator.spare).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from timellm_job.jobs.protocol import SpareClaim
from timellm_job.trainer import determinism

SETTINGS = {"auto": "auto", "true": True, "false": False}


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m timellm_job.trainer spare")
    ap.add_argument("--deterministic", choices=sorted(SETTINGS), required=True,
                    help="the job's train.deterministic (its cuBLAS workspace is set before torch is imported)")
    ap.add_argument("--preload", help="the backbone whose model class to import: a family, a hub id or a folder")
    return ap.parse_args(argv)


def model_class_name(backbone: str) -> str | None:
    """The transformers class a trainer builds for ``backbone`` (``LlamaModel``), when it is a
    family or its config is on this machine; None otherwise (nothing is downloaded)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    family = backbone if backbone in MODEL_MAPPING_NAMES else None
    if family is None:
        try:
            from transformers import AutoConfig

            family = AutoConfig.from_pretrained(backbone, local_files_only=True).model_type
        except Exception:  # noqa: BLE001 - not on this machine (or not a model): the trainer imports it then
            return None
    name = MODEL_MAPPING_NAMES.get(family)
    return name[0] if isinstance(name, tuple) else name


def preload(backbone: str | None) -> None:
    """The imports a trainer does before its first step."""
    import timellm_job.trainer.loop  # noqa: F401 - torch, the model, storage, the loop (its stopping too)

    if backbone:
        name = model_class_name(backbone)
        if name:
            import transformers

            getattr(transformers, name, None)  # transformers imports a model's module when it is first named


def take_log(path: str) -> None:
    """The attempt's log becomes this process's output, after what the imports printed."""
    try:
        early = os.pread(1, os.fstat(1).st_size, 0)
    except OSError:  # not a file we can read back: nothing to copy
        early = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    if early:
        os.write(fd, early)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)  # a cold trainer's standard input
    os.dup2(null, 0)
    os.close(null)


def main(argv: list[str], run: Callable[[list[str]], int]) -> int:
    """Wait to be claimed, then ``run`` (the trainer's main) with the claim's arguments."""
    a = _args(argv)
    determinism.environment(SETTINGS[a.deterministic])
    preload(a.preload)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    claim = SpareClaim.model_validate_json(line)
    take_log(claim.log)
    os.environ.update(claim.env)
    return run(claim.argv)
