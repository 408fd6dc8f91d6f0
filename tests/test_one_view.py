"""status and export-best see the job's own checkpoints only: another spec's checkpoint and a
copied folder, however new, are shown apart and never exported."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.cli import run
from tests.jobfiles import copy_of, job_dir
from timellm_job.storage import commit_checkpoint, job_store, list_checkpoints, load

pytestmark = pytest.mark.slow


def test_status_and_export_ignore_checkpoints_that_are_not_the_jobs(completed, tmp_path):
    spec = copy_of(completed, tmp_path)
    job = job_store(str(job_dir(spec).parent), job_dir(spec).name)
    own = list_checkpoints(job).committed
    best = next(m for m in own if m.kind == "best")
    foreign = {**load(job, best)}
    commit_checkpoint(job, 9000, "best", foreign, "another-spec", metadata={"val_loss": 0.0})  # a better-looking best
    src = job_dir(spec) / "checkpoints" / best.id
    copy = job_dir(spec) / "checkpoints" / "000009500-best"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    doc = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)
    assert doc["best"]["checkpoint"] == best.id
    assert {c["id"] for c in doc["checkpoints"]} == {m.id for m in own}
    assert {a["folder"] for a in doc["set_apart"]} == {"000009000-best", "000009500-best"}
    out = tmp_path / "export"
    assert run(tmp_path, "export-best", str(spec), "--out", str(out)).returncode == 0
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == best.id
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == \
        best.files["model.safetensors"].sha256
