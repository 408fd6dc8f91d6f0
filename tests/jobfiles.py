"""Small job specs for tests: the tiny example job on a short slice of ETTh1 (made in tmp)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ETTH1 = SHARED / "data" / "ETT-small" / "ETTh1.csv"
TINY_SPEC = SHARED / "spec" / "jobs" / "tiny-cpu.yaml"
BIG_SPEC = SHARED / "spec" / "jobs" / "etth1-llama3-nf4.yaml"


def slice_csv(folder: Path, rows: int = 700) -> Path:
    """The first ``rows`` rows of ETTh1, written under ``folder`` (never into the repo)."""
    out = folder / f"etth1-{rows}.csv"
    if not out.exists():
        lines = ETTH1.read_text().splitlines()
        out.write_text("\n".join(lines[: rows + 1]) + "\n")
    return out


def quick_spec(folder: Path, name: str = "quick", **sections) -> Path:
    """A job that trains in a few seconds: the tiny example on a 700-row custom slice."""
    raw = yaml.safe_load(TINY_SPEC.read_text())
    raw["name"] = name
    raw["storage"].update({"root": str(folder / "root"), "save_steps": 7, "save_total_limit": 2})
    raw["data"].update({"path": str(slice_csv(folder)), "kind": "custom", "features": "S",
                        "seq_len": 48, "label_len": 24, "pred_len": 12, "percent": 100})
    raw["model"].update({"patch_len": 8, "stride": 4, "num_tokens": 32})
    raw["train"].update({"epochs": 3, "batch_size": 16, "eval_batch_size": 64})
    raw["run"].update({"max_restarts": 30, "heartbeat_timeout_s": 60})
    for section, fields in sections.items():
        if isinstance(fields, dict):
            merged = copy.deepcopy(raw.get(section, {}))
            merged.update(fields)
            raw[section] = merged
        else:
            raw[section] = fields
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_of(completed: tuple[Path, Path], folder: Path) -> Path:
    """A copy of the completed job (the ``completed`` fixture) in ``folder``: its spec there
    (``quick_spec(folder)``: the same job, its data a copy of the same slice), whose storage root
    holds a copy of the finished job."""
    shutil.copytree(completed[1], folder / "root")
    return quick_spec(folder)


def job_dir(spec_path: Path) -> Path:
    raw = yaml.safe_load(spec_path.read_text())
    return Path(raw["storage"]["root"]) / raw["name"]


def final_state(job: Path) -> dict:
    """The trained result of the job folder ``job`` (see ``final_state_of``)."""
    from timellm_job.storage import job_store

    return final_state_of(job_store(str(job.parent), job.name))


def final_state_of(store) -> dict:
    """The trained result in a job's store (any backend): the final step checkpoint's and the
    best's hashes, and the results document."""
    from timellm_job.storage import list_checkpoints
    from timellm_job.storage.documents import read_json

    committed = list_checkpoints(store).committed
    final = max((m for m in committed if m.kind == "step"), key=lambda m: m.progress)
    best = max((m for m in committed if m.kind == "best"), key=lambda m: m.progress)
    results = read_json(store, "results.json")
    results.pop("best_checkpoint", None)
    results.pop("spec_hash", None)  # it covers data.path, which differs between tmp folders
    return {"final_model": final.files["model.safetensors"].sha256,
            "final_optimizer": {k: v.sha256 for k, v in final.files.items() if k.startswith("optimizer-")},
            "final_step": final.step, "best_model": best.files["model.safetensors"].sha256,
            "best_step": best.step, "results": results}


def file_of(store, ckpt_id: str, name: str, base: str = "checkpoints") -> str:
    """Where a committed checkpoint's file lies in its store (relative): in the checkpoint's own
    folder on POSIX, under the writer's prefix its manifest names on object stores."""
    from timellm_job.storage.manifest import MANIFEST, parse_manifest

    manifest = parse_manifest(store.read_bytes(f"{base}/{ckpt_id}/{MANIFEST}"))
    return f"{manifest.data_folder(base)}/{name}"


def solo_run(folder: Path, **sections) -> dict:
    """The quick job (with ``sections`` as in ``quick_spec``) trained once, uninterrupted, by the
    trainer alone: its ``final_state``, what every interrupted run of it must reproduce."""
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    spec = quick_spec(folder, **sections)
    proc = subprocess.run([sys.executable, "-m", "timellm_job.trainer", "run", str(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return final_state(job_dir(spec))
