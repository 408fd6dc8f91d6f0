"""``timellm-job table``: every job under a root, as the paper lays out its results, from storage
alone; averages that say what they were taken over, and no number invented."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from tests.cli import run
from tests.jobfiles import copy_of, job_dir, quick_spec
from timellm_job.jobs import load_spec
from timellm_job.orchestrator.redaction import redacted_yaml
from timellm_job.storage import open_store


def _job(root, tmp_path, name: str, pred_len: int, seed: int, mse: float | None, phase: str = "completed",
         fields: dict | None = None, ablation: str = "none") -> None:
    """A job folder as submit leaves it: the stored spec, state.json, and results when it completed."""
    spec = load_spec(quick_spec(tmp_path, name=name, data={"pred_len": pred_len}, train={"seed": seed},
                                model={"ablation": ablation}))
    job = root.child(name)
    job.create("job.yaml", redacted_yaml(spec).encode())
    job.create("state.json", json.dumps({"name": name, "phase": phase, "global_step": 5, "total_steps": 20,
                                         "goodput": {"share": 0.5}}).encode())
    if mse is not None:
        job.create("results.json", json.dumps({"val_loss": mse + 0.1, "test": {
            "mse": mse, "mae": mse / 2, "mse_data_units": mse * 10, "mae_data_units": mse * 5}}).encode())
    if fields:
        job.create("sweep.json", json.dumps({"sweep": "s", "fields": fields}).encode())


@pytest.fixture
def root(tmp_path):
    store = open_store(str(tmp_path / "root"))
    _job(store, tmp_path, "h96-s1", 96, 1, 0.40, fields={"data.pred_len": 96, "train.seed": 1})
    _job(store, tmp_path, "h96-s2", 96, 2, 0.44, fields={"data.pred_len": 96, "train.seed": 2})
    _job(store, tmp_path, "h192-s1", 192, 1, 0.50, fields={"data.pred_len": 192, "train.seed": 1})
    _job(store, tmp_path, "h192-s2", 192, 2, None, phase="running", fields={"data.pred_len": 192, "train.seed": 2})
    store.child("torn").create("state.json", b'{"name": "torn", "pha')  # half a document
    return tmp_path


def _listing(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_one_row_per_job_with_the_contracts_fields_and_nothing_written(root):
    before = _listing(root / "root")
    out = run(root, "table", "--root", str(root / "root"), "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"h96-s1", "h96-s2", "h192-s1", "h192-s2", "torn"}
    for r in rows.values():
        assert {"name", "phase", "fields", "test", "best_val_loss"} <= set(r)
    assert rows["h96-s2"]["test"] == {"mse": 0.44, "mae": 0.22} and rows["h96-s2"]["fields"]["train.seed"] == 2
    assert rows["h96-s2"]["best_val_loss"] == pytest.approx(0.54) and rows["h96-s2"]["goodput"] == 0.5
    assert rows["h192-s2"]["test"] is None and rows["h192-s2"]["phase"] in ("running", "interrupted")
    assert rows["torn"]["phase"] == "unreadable" and rows["torn"]["test"] is None and "state.json" in rows["torn"]["problem"]
    assert _listing(root / "root") == before  # read-only


def test_means_over_seeds_per_horizon_and_the_average_over_horizons(root):
    md = run(root, "table", "--root", str(root / "root")).stdout
    mse, mae = statistics.stdev([0.40, 0.44]), statistics.stdev([0.20, 0.22])
    assert f"| etth1-700 | Time-LLM | 96 | - | 2 | 0.4200 ± {mse:.4f} | 0.2100 ± {mae:.4f} |" in md, md
    assert "| etth1-700 | Time-LLM | 192 | - | 1 | 0.5000 | 0.2500 |" in md, md  # the unfinished seed left out
    assert "| etth1-700 | Time-LLM | - | 96, 192 | 0.4600 | 0.2300 |" in md, md  # the average over the two horizons
    assert "| interrupted 5/20 | - | - |" in md, md  # no lease holds it: its runtime is gone
    table = list(csv.reader(io.StringIO(run(root, "table", "--root", str(root / "root"), "--format", "csv").stdout)))
    assert table[0][:7] == ["name", "dataset", "model", "pred_len", "seed", "fields", "phase"] and len(table) == 6


def test_an_llm_free_variant_is_its_own_row_group_never_pooled_with_time_llm(root):
    store = open_store(str(root / "root"))
    _job(store, root, "h96-s1-attn", 96, 1, 0.30, ablation="attention",
         fields={"data.pred_len": 96, "train.seed": 1, "model.ablation": "attention"})
    _job(store, root, "h96-s2-attn", 96, 2, 0.32, ablation="attention")  # not a sweep's: its spec says it
    md = run(root, "table", "--root", str(root / "root")).stdout
    spread = statistics.stdev([0.30, 0.32])
    assert f"| etth1-700 | LLM-free: attention | 96 | - | 2 | 0.3100 ± {spread:.4f} |" in md, md
    assert "| etth1-700 | Time-LLM | 96 | - | 2 | 0.4200" in md, md  # as before: the variant stays apart
    rows = {r["name"]: r for r in json.loads(run(root, "table", "--root", str(root / "root"), "--format", "json").stdout)}
    assert rows["h96-s2-attn"]["model"] == "LLM-free: attention" and rows["h96-s1"]["model"] == "Time-LLM"


@pytest.mark.slow
def test_a_job_submit_completed_is_a_row_with_its_results(completed, tmp_path):
    spec = copy_of(completed, tmp_path)
    rows = json.loads(run(tmp_path, "table", "--root", str(job_dir(spec).parent), "--format", "json").stdout)
    results = json.loads((job_dir(spec) / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["phase"] == "completed" and rows[0]["pred_len"] == 12
    assert rows[0]["test"] == {"mse": results["test"]["mse"], "mae": results["test"]["mae"]}
    assert rows[0]["best_val_loss"] == results["val_loss"] and 0 < rows[0]["goodput"] <= 1
