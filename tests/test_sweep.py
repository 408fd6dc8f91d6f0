"""``timellm-job sweep``: a grid of dotted job fields expanded into ordinary jobs under one root,
run by the local engine; bad sweeps refused whole, naming the field, with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.cli import REPO, SLOW, run, start, state, submit_of, wait_for_checkpoint, wait_until
from tests.jobfiles import final_state, quick_spec
from timellm_job.jobs import SpecError, load_spec
from timellm_job.jobs.sweep import load_sweep, parse_sweep

NEXT = REPO.parent / "shared" / "spec" / "jobs-next" / "sweep-tiny.yaml"


def _sweep(tmp_path: Path, grid: dict, name: str = "s", base: str | None = None) -> Path:
    base = base or str(quick_spec(tmp_path))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "grid": grid}, sort_keys=False))
    return path


def test_the_contracts_example_expands_into_four_ordinary_jobs_with_stable_names(tmp_path):
    first, again = load_sweep(NEXT, root=str(tmp_path)), load_sweep(NEXT, root=str(tmp_path))
    names = [p.name for p in first.points]
    assert names == [p.name for p in again.points] == ["tiny-sweep-pred_len12-seed1", "tiny-sweep-pred_len12-seed2",
                                                         "tiny-sweep-pred_len24-seed1", "tiny-sweep-pred_len24-seed2"]
    for p in first.points:
        assert p.spec.name == p.name and p.spec.storage.root == str(tmp_path)
        assert (p.spec.data.pred_len, p.spec.train.seed) == (p.fields["data.pred_len"], p.fields["train.seed"])
        assert Path(p.spec.data.path).is_file()  # the base's relative path, resolved against the base


def test_names_stay_unique_and_safe_whatever_the_values(tmp_path):
    grid = {"model.dropout": [0.1, 0.2], "train.dropout_like": [1]}
    with pytest.raises(SpecError, match=r"grid\.train\.dropout_like"):  # not a job field
        parse_sweep({"name": "s", "base": str(quick_spec(tmp_path)), "grid": grid}, tmp_path)
    sweep = parse_sweep({"name": "s", "base": str(quick_spec(tmp_path)),
                         "grid": {"data.target": ["OT", "O/T"], "model.dropout": [0.1]}}, tmp_path, str(tmp_path))
    names = [p.name for p in sweep.points]
    assert len(set(names)) == 2 and all("/" not in n for n in names)


def test_a_sweep_or_its_base_that_is_not_yaml_is_said_as_a_job_spec_is(tmp_path):
    """One reader for every YAML file the product takes: the same words and the same position."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as sweep_err:
        load_sweep(bad)
    with pytest.raises(SpecError) as spec_err:
        load_spec(bad)
    assert str(sweep_err.value) == str(spec_err.value)
    assert "not valid YAML (line 2, column 1)" in str(spec_err.value)
    with pytest.raises(SpecError) as base_err:
        parse_sweep({"name": "s", "base": str(bad), "grid": {"model.dropout": [0.1]}}, tmp_path)
    assert f"base: {spec_err.value}" in base_err.value.problems
    with pytest.raises(SpecError, match=r"base: .*missing\.yaml: no such file"):
        parse_sweep({"name": "s", "base": "missing.yaml", "grid": {"model.dropout": [0.1]}}, tmp_path)


@pytest.mark.parametrize("grid,field", [
    ({"data.pred_lenn": [12]}, "grid.data.pred_lenn"),  # unknown
    ({"data.pred_len": []}, "grid.data.pred_len"),  # empty
    ({"data.pred_len": [12, 0]}, "grid.data.pred_len: 0"),  # a value the job refuses
    ({"name": ["a", "b"]}, "grid.name"),  # the sweep names its jobs
])
def test_a_bad_grid_exits_2_naming_the_field_and_writes_nothing(tmp_path, grid, field):
    result = run(tmp_path, "sweep", str(_sweep(tmp_path, grid)), "--root", str(tmp_path / "sweep-root"))
    assert result.returncode == 2 and field in result.stderr, result.stderr
    assert not (tmp_path / "sweep-root").exists() and not (tmp_path / "work").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
def test_ray_not_installed_is_refused_before_anything_is_written(tmp_path):
    result = run(tmp_path, "sweep", str(_sweep(tmp_path, {"train.seed": [1]})), "--on", "ray",
                 "--root", str(tmp_path / "sweep-root"))
    assert result.returncode == 2 and "--on ray" in result.stderr and "timellm-job[ray]" in result.stderr
    assert not (tmp_path / "sweep-root").exists()


@pytest.mark.slow
def test_a_sweeps_job_whose_runtime_died_is_run_again_and_ends_as_its_solo_run(reference, tmp_path):
    root = tmp_path / "sweep-root"
    sweep = _sweep(tmp_path, {"train.seed": [2021, 7]}, name="seeds")  # 2021: the reference's own seed
    proc = start(tmp_path, "sweep", str(sweep), "--root", str(root), "--max-parallel", "2", **SLOW)
    job, workdir = root / "seeds-seed2021", tmp_path / "work" / "sweeps" / "seeds"
    wait_for_checkpoint(job, "step", proc)
    submit = wait_until(lambda: submit_of(str(workdir / f"{job.name}.yaml")), "the job's submit", alive=[proc])
    os.killpg(submit.pid, signal.SIGKILL)  # the whole runtime of that job, as a vanished VM
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "seeds-seed2021 ended with exit -9: run again" in out
    assert state(job)["phase"] == "completed" and final_state(job) == reference
    assert state(root / "seeds-seed7")["phase"] == "completed"
    again = run(tmp_path, "sweep", str(sweep), "--root", str(root), "--max-parallel", "2")
    assert again.returncode == 0, again.stderr
    logs = (workdir / "seeds-seed2021.log").read_text()
    assert logs.count("is completed already") == 1  # the second sweep trained nothing
    rows = {r["name"]: r for r in json.loads(run(tmp_path, "table", "--root", str(root), "--format", "json").stdout)}
    assert rows["seeds-seed7"]["fields"] == {"train.seed": 7} and rows["seeds-seed2021"]["test"] is not None


def test_the_papers_ett_sweep_is_sixteen_jobs_each_dataset_with_its_own_file(tmp_path):
    sweep = load_sweep(REPO / "examples" / "sweep-ett-paper.yaml", root=str(tmp_path))
    got = {(p.spec.data.kind, p.spec.data.path.rsplit("/", 1)[-1], p.spec.data.pred_len) for p in sweep.points}
    assert len(sweep.points) == len(got) == 16
    assert all(path == f"{kind}.csv" for kind, path, _ in got)
    assert {h for *_, h in got} == {96, 192, 336, 720}
    assert sweep.points[0].name == "ett-paper-dataETTh1-pred_len96"
    assert all(p.spec.model.quantization == "nf4" for p in sweep.points)  # the rest is the base's
