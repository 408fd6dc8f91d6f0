"""Nothing committed is lost whatever the world does to a job's folder, end to end through the CLI:
a best that rots, an import of a worse run, a torn state.json, the data moved or changed
(issue 23, items 1, 2, 9, 10, 11). One job is trained once (the ``completed`` fixture); each test works
on a copy of it."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from tests.cli import run, state
from tests.jobfiles import final_state
from timellm_job.storage import job_store, list_checkpoints
from timellm_job.storage.layout import SET_APART

pytestmark = pytest.mark.slow


def _copy(completed, tmp_path) -> tuple[Path, Path]:
    """A copy of the completed job's storage root: (the spec, the copy's root)."""
    spec, root = completed
    shutil.copytree(root, tmp_path / "root")
    return spec, tmp_path / "root"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _status(tmp_path, spec, root) -> dict:
    result = run(tmp_path, "status", str(spec), "--root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_rotten_best_is_set_apart_and_the_job_completes_bit_identical(completed, reference, tmp_path):
    """Item 1: one flipped byte in the best's model after the runtime vanished during the final
    test made every resubmit crash three times (a crash loop, forever). The best that does not
    verify is now set apart, never deleted; the job trains it again and ends as it would have."""
    spec, root = _copy(completed, tmp_path)
    job = root / "quick"
    (job / "results.json").unlink()  # the runtime vanished during the final test
    best = _status(tmp_path, spec, root)["best"]["checkpoint"]
    target = job / "checkpoints" / best / "model.safetensors"
    rotten = bytearray(target.read_bytes())
    rotten[200] ^= 0x01
    target.write_bytes(bytes(rotten))
    result = run(tmp_path, "submit", str(spec), "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert final_state(job) == reference  # the same best, the same test metrics, bit for bit
    aside = [p for p in (job / SET_APART).iterdir() if p.is_dir()]
    assert len(aside) == 1 and aside[0].name.startswith(best)
    assert (aside[0] / "model.safetensors").read_bytes() == bytes(rotten)  # kept as it was found
    doc = _status(tmp_path, spec, root)
    assert doc["phase"] == "completed" and doc["best"]["checkpoint"] == best
    assert any(a.get("moved") and a["folder"] == f"{SET_APART}/{aside[0].name}" for a in doc["set_apart"])
    verified = run(tmp_path, "status", str(spec), "--root", str(root), "--json", "--verify")
    assert verified.returncode == 0, verified.stdout


def _upstream_run(spec, folder: Path, val_loss: float) -> Path:
    """A run folder as the upstream fork writes it, for this job's model: ``checkpoint`` (its best)
    beside ``checkpoint_step_3/checkpoint.pt`` whose ``val_loss_min`` is ``val_loss``."""
    from tests.test_import_upstream import upstream_checkpoint

    path, _, _ = upstream_checkpoint(spec, folder, steps=3, epoch=0)
    obj = torch.load(path, weights_only=False)
    obj["val_loss_min"] = val_loss
    run_dir = folder / "upstream-run"
    (run_dir / "checkpoint_step_3").mkdir(parents=True)
    torch.save(obj, run_dir / "checkpoint_step_3" / "checkpoint.pt")
    torch.save(obj["model"], run_dir / "checkpoint")
    return run_dir


def test_an_import_into_a_job_with_checkpoints_is_refused_and_add_never_displaces_its_best(completed, tmp_path):
    """Item 2: importing a run whose best has validation loss 9.9 into a completed job deleted
    the job's own best and a step, status showed the worse best beside the deleted one's test
    metrics and results.json named a deleted checkpoint. Now the import is refused (exit 2,
    nothing written) unless --add; with --add the job's best stays its best, nothing is deleted."""
    spec, root = _copy(completed, tmp_path)
    job = root / "quick"
    before = _status(tmp_path, spec, root)
    run_dir = _upstream_run(spec, tmp_path, val_loss=9.9)
    files = _tree(root)
    refused = run(tmp_path, "import", str(spec), str(run_dir), "--root", str(root))
    assert refused.returncode == 2 and "--add" in refused.stderr, refused.stderr
    assert _tree(root) == files  # nothing written
    added = run(tmp_path, "import", str(spec), str(run_dir), "--root", str(root), "--add")
    assert added.returncode == 0, added.stderr
    ids = {m.id for m in list_checkpoints(job_store(str(root), "quick")).committed}
    assert {c["id"] for c in before["checkpoints"]} <= ids  # nothing of the job's was deleted
    after = _status(tmp_path, spec, root)
    assert after["best"] == before["best"] and after["best"]["val_loss"] < 9.9
    results = json.loads((job / "results.json").read_text())
    assert results["best_checkpoint"] == after["best"]["checkpoint"] in ids
    assert after["metrics"]["checkpoint"] == after["best"]["checkpoint"]
    again = run(tmp_path, "submit", str(spec), "--root", str(root))
    assert again.returncode == 0 and "completed already" in again.stderr


def test_a_torn_state_json_is_rebuilt_from_storage_and_blocks_nothing(completed, tmp_path):
    """Item 9: a torn state.json blocked submit, status and list (list for every job under the
    root). It is derived: readers rebuild what storage knows and say so; a submit keeps the torn
    bytes under set-apart/, writes a whole one, and numbers its attempt after the old ones."""
    spec, root = _copy(completed, tmp_path)
    job = root / "quick"
    torn = (job / "state.json").read_bytes()[:150]
    (job / "state.json").write_bytes(torn)
    doc = _status(tmp_path, spec, root)
    assert "could not be read" in doc["rebuilt"] and doc["phase"] == "completed"
    assert doc["best"] is not None and len(doc["attempts"]) == 1
    listed = run(tmp_path, "list", "--root", str(root), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["phase"]) for r in json.loads(listed.stdout)] == [("quick", "unreadable")]
    assert run(tmp_path, "submit", str(spec), "--root", str(root)).returncode == 0  # completed already
    (job / "results.json").unlink()  # not complete: this submit takes the lease and writes state.json
    log_before = (job / "logs" / "attempt-001-0000.log").read_bytes()
    result = run(tmp_path, "submit", str(spec), "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "rebuilt from storage" in result.stderr
    kept = [p for p in (job / SET_APART).iterdir() if p.name.startswith("state.json.unreadable-")]
    assert len(kept) == 1 and kept[0].read_bytes() == torn
    now = state(job)
    assert now["phase"] == "completed" and [a["number"] for a in now["attempts"]] == [1, 2]
    assert (job / "logs" / "attempt-001-0000.log").read_bytes() == log_before  # not overwritten


def test_the_same_data_elsewhere_is_the_same_job_and_changed_data_is_refused(completed, tmp_path):
    """Item 10: the spec hash held the absolute data.path, so the same job.yaml and the same CSV
    at another path (Colab, then a VM) set every checkpoint apart as another spec. The job is
    what its data is: moved, it is found whole; changed, it is refused naming data.path.
    Item 11: the stored job.yaml is readable by its owner alone."""
    spec, root = _copy(completed, tmp_path)
    job = root / "quick"
    assert stat.S_IMODE((job / "job.yaml").stat().st_mode) == 0o600
    import yaml

    raw = yaml.safe_load(spec.read_text())
    moved = tmp_path / "elsewhere" / "ETTh1-slice.csv"
    moved.parent.mkdir()
    shutil.copy(raw["data"]["path"], moved)
    raw["data"]["path"] = str(moved)
    moved_spec = tmp_path / "moved.yaml"
    moved_spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "export"
    exported = run(tmp_path, "export-best", str(moved_spec), "--root", str(root), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    again = run(tmp_path, "submit", str(moved_spec), "--root", str(root))
    assert again.returncode == 0 and "completed already" in again.stderr
    (job / "results.json").unlink()  # so that a submit would train: it must refuse the changed data
    lines = moved.read_text().splitlines()
    cells = lines[5].split(",")
    cells[-1] = str(float(cells[-1]) + 1.0)
    lines[5] = ",".join(cells)
    moved.write_text("\n".join(lines) + "\n")
    files = _tree(root)
    changed = run(tmp_path, "submit", str(moved_spec), "--root", str(root))
    assert changed.returncode == 2 and "data.path" in changed.stderr and "other data" in changed.stderr
    assert _tree(root) == files
