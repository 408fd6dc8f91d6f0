"""Importing checkpoints written by the upstream Time-LLM code (dicts built here with upstream's
names and shapes; nothing downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli import REPO, run, state
from jobfiles import job_dir, quick_spec
from safetensors.torch import load as st_load

from jobs import load_spec
from storage import job_store, list_checkpoints, load


def upstream_checkpoint(spec_path, tmp_path, *, full=True, with_backbone=True, steps=5, epoch=0):
    """What upstream's run_main.py saves: module-prefixed names, the frozen LLM included."""
    from trainer.loop import Trainer

    t = Trainer(load_spec(spec_path), background_saves=False)
    t.build()
    params = t.model.trainable_state()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # a few Adam steps, so there are moments to carry over
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        t.optimizer.step()
        t.scheduler.step()
    sd = {f"module.{k}": v.detach().clone() for k, v in params.items()}
    if with_backbone:
        sd["module.llm_model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64)
        sd["module.word_embeddings"] = torch.zeros(512, 64)
    obj = {"model": sd, "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
           "epoch": epoch, "global_step": steps, "best_score": -0.25, "val_loss_min": 0.25} if full else sd
    path = tmp_path / "checkpoint.pt"
    torch.save(obj, path)
    return path, {k: v.detach().clone() for k, v in params.items()}, t.optimizer.state_dict()


def test_full_upstream_checkpoint_imports_and_training_continues_from_it(tmp_path):
    spec = quick_spec(tmp_path)
    path, params, opt = upstream_checkpoint(spec, tmp_path)
    result = run(tmp_path, "import", str(spec), str(path), "--as", "step")
    assert result.returncode == 0, result.stderr
    job = job_store(str(tmp_path / "root"), "quick")
    [m] = list_checkpoints(job).committed
    assert m.step == 5 and m.kind == "step"
    files = load(job, m)
    saved = st_load(bytes(files["model.safetensors"]))
    assert set(saved) == set(params) and all(torch.equal(saved[k], params[k]) for k in params)
    moments = st_load(bytes(files["optimizer-exp_avg.safetensors"]))
    assert torch.equal(moments["state.1.exp_avg"], opt["state"][1]["exp_avg"])
    doc = json.loads(bytes(files["trainer_state.json"]))
    assert doc["progress"]["best_val"] == 0.25 and doc["scheduler"]["last_epoch"] == 5
    submitted = run(tmp_path, "submit", str(spec))
    assert submitted.returncode == 0, submitted.stderr
    first = state(job_dir(spec))["attempts"][0]
    assert first["resumed_from"] == {"id": m.id, "step": 5} and first["start_step"] == 5


def test_a_mismatched_model_is_refused_with_a_table_and_nothing_written(tmp_path):
    spec = quick_spec(tmp_path)
    path, _, _ = upstream_checkpoint(spec, tmp_path)
    result = run(tmp_path, "import", str(spec), str(path), "--set", "model.d_model=8", "--set", "data.pred_len=6")
    assert result.returncode == 2
    assert "patch_embedding.value_embedding.tokenConv.weight" in result.stderr
    assert "output_projection.linear.weight" in result.stderr and "this job" in result.stderr
    assert not (tmp_path / "root").exists()


def test_a_bare_state_dict_needs_weights_only(tmp_path):
    spec = quick_spec(tmp_path)
    path, params, _ = upstream_checkpoint(spec, tmp_path, full=False)
    refused = run(tmp_path, "import", str(spec), str(path), "--as", "best")
    assert refused.returncode == 2 and "--weights-only" in refused.stderr
    assert not (tmp_path / "root").exists()
    result = run(tmp_path, "import", str(spec), str(path), "--as", "best", "--weights-only")
    assert result.returncode == 0, result.stderr
    job = job_store(str(tmp_path / "root"), "quick")
    [m] = list_checkpoints(job).committed
    assert m.kind == "best" and m.step == 0
    saved = st_load(bytes(load(job, m, ["model.safetensors"])["model.safetensors"]))
    assert all(torch.equal(saved[k], params[k]) for k in params)


class Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_files_that_need_unpickling_are_refused(tmp_path):
    spec = quick_spec(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {"mapping_layer.weight": torch.zeros(1)}, "extra": Evil()}, path)
    result = run(tmp_path, "import", str(spec), str(path))
    assert result.returncode == 2 and "unpickling" in result.stderr
    assert "this would have run" not in result.stdout
    assert not (tmp_path / "root").exists()


def test_import_into_a_running_job_is_refused(tmp_path):
    spec = quick_spec(tmp_path)
    path, _, _ = upstream_checkpoint(spec, tmp_path)
    from storage import lease as leases

    job = job_store(str(tmp_path / "root"), "quick")
    leases.acquire(job, ttl_s=600)  # held by this (live) test process
    result = subprocess.run([sys.executable, "-m", "trainer", "import", str(spec), str(path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 3 and "is running" in result.stderr


@pytest.mark.parametrize("name", ["llm_model.x", "word_embeddings"])
def test_frozen_backbone_entries_are_dropped(name):
    import io

    from trainer.upstream import read_upstream

    buf = io.BytesIO()
    torch.save({name: torch.zeros(2), "mapping_layer.bias": torch.ones(3)}, buf)
    up = read_upstream(buf.getvalue())
    assert list(up.params) == ["mapping_layer.bias"] and up.dropped == [name]
