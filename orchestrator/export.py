"""``export-best``: the best model as verified safetensors, its config and its metrics.

Invariants:
- The best checkpoint is verified against its manifest (every file's size and sha256) before a
  byte is exported; on a mismatch nothing is written and :class:`ExportError` names the file.
- ``model.safetensors`` is the checkpoint's file byte for byte; it is read back after writing
  and its sha256 compared with the manifest's.
- ``config.json`` holds the model and data sections and the data scaling: enough for
  ``trainer.predict.load_exported`` to rebuild the forecaster.
"""

from __future__ import annotations

import json

import yaml

from timellm_job.storage import CorruptCheckpoint, Store, list_checkpoints, load, open_store
from timellm_job.storage.checkpoints import verify
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import RESULTS, SPEC
from timellm_job.storage.retention import rank_bests

MODEL = "model.safetensors"
FORMAT = "timellm-job/export-v1"


class ExportError(RuntimeError):
    pass


def export_best(job: Store, out_url: str, out_options: dict | None = None,
                spec_hash: str | frozenset[str] | None = None) -> dict:
    """Export the job's best checkpoint (of ``spec_hash``: never another spec's)."""
    ranked = rank_bests([m for m in list_checkpoints(job, spec_hash=spec_hash).committed if m.kind == "best"])
    best = ranked[0] if ranked else None  # the lowest validation loss, never the newest arrival
    if best is None:
        raise ExportError(f"no best checkpoint under {job.url_of('checkpoints')} yet")
    others = {k: v for k, v in best.files.items() if k != MODEL}
    problems = verify(job, best.model_copy(update={"files": others}), hashes=True)
    if problems:
        raise ExportError(f"checkpoint {best.id} does not verify, nothing exported: {'; '.join(problems)}")
    try:
        model_bytes = load(job, best, [MODEL])[MODEL]
    except CorruptCheckpoint as err:
        raise ExportError(f"checkpoint {best.id} does not verify, nothing exported: {'; '.join(err.problems)}") from None
    spec = yaml.safe_load(job.read_bytes(SPEC))
    results = read_json(job, RESULTS) or {}
    tested = results.get("best_checkpoint") == best.id
    config = {"format": FORMAT, "name": spec["name"], "checkpoint": best.id, "step": best.step,
              "model": spec["model"], "data": spec["data"], "scaling": best.metadata.get("scaling"),
              "seed": spec["train"]["seed"], "sha256": {MODEL: best.files[MODEL].sha256}}
    metrics = {"checkpoint": best.id, "step": best.step,
               "val_loss": best.metadata.get("val_loss", best.metadata.get("best_val")),
               "test": results.get("test") if tested else None}
    out = open_store(out_url, out_options)
    written = out.write_file(MODEL, model_bytes)
    if written.sha256 != best.files[MODEL].sha256:
        raise ExportError(f"{out.url_of(MODEL)}: written bytes do not match the checkpoint")
    out.replace("config.json", json.dumps(config, indent=1).encode())
    out.replace("metrics.json", json.dumps(metrics, indent=1).encode())
    _, digest = out.read_file(MODEL)
    if digest != best.files[MODEL].sha256:
        raise ExportError(f"{out.url_of(MODEL)}: read back with another sha256; the export is not whole")
    return metrics
