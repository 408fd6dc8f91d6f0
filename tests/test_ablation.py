"""``model.ablation``: the LLM-free variants of Time-LLM (Tan et al., NeurIPS 2024) as a job field:
no backbone built, the same head, and checkpoints, resume, export, predict, status and table
working as for Time-LLM."""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest
import torch
import yaml

from tests.cli import SLOW, run, running_trainer, start, state, wait_for_checkpoint
from tests.jobfiles import final_state, quick_spec, solo_run
from timellm_job.jobs import SpecError, load_spec, spec_hash
from timellm_job.trainer.model import TimeLLM
from timellm_job.trainer.model.timellm import trainable_parameters


@pytest.mark.parametrize("ablation", ["no_llm", "attention", "transformer"])
def test_each_variant_forecasts_without_a_backbone_and_its_size_is_known_before_it_is_built(tmp_path, ablation):
    spec = load_spec(quick_spec(tmp_path, model={"ablation": ablation}))
    torch.manual_seed(0)
    model = TimeLLM(spec.model, spec.data, None)  # no LLM: nothing to load
    x = torch.randn(3, spec.data.seq_len, 2)
    assert model(x).shape == (3, spec.data.pred_len, 2)
    built = sum(p.numel() for p in model.trainable_state().values())
    assert built == sum(trainable_parameters(spec.model, spec.data, vocab=0, d_llm=0).values())
    names = set(model.trainable_state())
    assert any(n.startswith("mixing.") for n in names) == (ablation != "no_llm")
    assert not any(n.startswith(("mapping_layer", "reprogramming_layer")) for n in names)
    model(x).sum().backward()  # every trainable part learns
    assert all(p.grad is not None for p in model.trainable_state().values())


def test_a_bad_variant_or_heads_that_do_not_divide_the_width_name_their_field(tmp_path):
    with pytest.raises(SpecError, match="model.ablation"):
        load_spec(quick_spec(tmp_path, model={"ablation": "no_lm"}))
    with pytest.raises(SpecError, match="n_heads"):
        load_spec(quick_spec(tmp_path, model={"ablation": "attention", "d_model": 30, "n_heads": 8}))
    load_spec(quick_spec(tmp_path, model={"ablation": "no_llm", "d_model": 30, "n_heads": 8}))  # no heads there


def test_none_is_the_job_it_always_was_and_a_variant_is_another_job(tmp_path):
    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    before = spec_hash(load_spec(quick_spec(tmp_path)))
    raw["model"]["ablation"] = "none"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert spec_hash(load_spec(tmp_path / "s.yaml")) == before
    raw["model"]["ablation"] = "attention"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert spec_hash(load_spec(tmp_path / "s.yaml")) != before


@pytest.mark.slow
def test_a_killed_variant_resumes_bit_for_bit_and_exports_predicts_and_shows_as_llm_free(tmp_path):
    solo = solo_run(tmp_path / "solo", model={"ablation": "transformer"})
    spec = quick_spec(tmp_path, model={"ablation": "transformer"})
    job = tmp_path / "root" / "quick"
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    wait_for_checkpoint(job, "step", proc)
    os.kill(running_trainer(job, submit=proc)["pid"], signal.SIGKILL)  # this job's trainer, not another test's
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    doc = state(job)
    assert len(doc["attempts"]) >= 2 and final_state(job) == solo
    assert doc["attempts"][0]["backbone_source"] == "none: model.ablation transformer"
    status = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)
    assert status["model"] == "LLM-free: transformer"
    (row,) = json.loads(run(tmp_path, "table", "--root", str(tmp_path / "root"), "--format", "json").stdout)
    assert row["model"] == "LLM-free: transformer" and row["test"]["mse"] == solo["results"]["test"]["mse"]
    out_dir = tmp_path / "export"
    assert run(tmp_path, "export-best", str(spec), "--out", str(out_dir)).returncode == 0
    data = pd.read_csv(load_spec(spec).data.path).iloc[-60:-12]
    data.to_csv(tmp_path / "input.csv", index=False)
    predicted = run(tmp_path, "predict", str(out_dir), "--input", str(tmp_path / "input.csv"))
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.strip().splitlines()) == 1 + 12  # a header and pred_len rows
