"""The tiny job end to end through ``timellm-job``: kills, preemptions, hangs, crash loops,
two submitters, export and prediction. Every interrupted run must end bit-identical to the
uninterrupted reference."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from tests.cli import (
    SLOW,
    resume_after_preemption,
    run,
    running_trainer,
    start,
    state,
    wait_for_new_ground,
    wait_for_step,
    wait_until,
)
from tests.jobfiles import copy_of, final_state, job_dir, quick_spec

pytestmark = pytest.mark.slow


def test_random_trainer_kills_are_restarted_and_end_bit_identical(reference, tmp_path):
    """Every trainer starts cold here (``run.warm_spare: false``): tests/test_spare.py and the
    chaos run prove the same of restarts that claim warm spares."""
    spec = quick_spec(tmp_path, run={"warm_spare": False})
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    rng = random.Random(7)
    killed = 0
    for _ in range(4):
        attempt = running_trainer(job, after=len(state(job).get("attempts") or []) - 1, submit=proc)
        if attempt is None:  # the job finished before this kill
            break
        # past start-up and past where the attempt before ended: never three kills at one step,
        # which would rightly be a crash loop
        wait_for_new_ground(tmp_path, job, attempt["number"])
        time.sleep(rng.uniform(0.0, 1.2))  # then anywhere in training, a checkpoint write included
        if proc.poll() is not None:
            break
        os.kill(attempt["pid"], signal.SIGKILL)
        killed += 1
        running_trainer(job, after=attempt["number"], submit=proc)  # the supervisor restarted it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert killed >= 3
    doc = state(job)
    # every kill that landed on a running trainer cost one restart (a kill can race the last exit)
    assert doc["phase"] == "completed" and doc["restarts"] == len(doc["attempts"]) - 1 >= 2
    assert all("SIGKILL" in (a["reason"] or "") for a in doc["attempts"][:-1])
    assert not any(a["warm_spare"] for a in doc["attempts"])
    assert all(a["resumed_from"] is not None for a in doc["attempts"][1:] if a["start_step"])
    assert final_state(job) == reference


@pytest.mark.parametrize("target", ["submit", "group"])
def test_sigterm_preempts_with_a_verified_checkpoint_and_resumes_bit_identical(reference, tmp_path, target):
    spec = quick_spec(tmp_path)
    job = job_dir(spec)
    # the VM that shuts down is another machine than the one that resumes: another card, another torch
    other = {"TIMELLM_TEST_PLATFORM": json.dumps({"torch": "2.12.0", "card": "Tesla T4"})} if target == "group" else {}
    proc = start(tmp_path, "submit", str(spec), **SLOW, **other)
    attempt = running_trainer(job)
    wait_for_step(job, 12)
    if target == "submit":
        proc.send_signal(signal.SIGTERM)
    else:  # a VM shutdown: every process gets SIGTERM at once
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(attempt["pid"], signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    doc = resume_after_preemption(tmp_path, spec, job)
    assert doc["attempts"][-1]["backbone_source"].startswith("local-cache:")  # not built again
    # issue 26: every checkpoint records its platform, and a resume says what it promises
    assert doc["attempts"][-1]["resume_exactness"] == ("bit for bit" if target == "submit" else
                                                       f"up to float order (card Tesla T4 -> None; torch 2.12.0 -> "
                                                       f"{torch.__version__})")
    assert doc["attempts"][-1]["resume_exactness"] in run(tmp_path, "status", str(spec), COLUMNS="300").stdout
    assert final_state(job) == reference  # on a CPU the math is the same: only the promise differs


def test_two_submits_at_once_one_exits_3(tmp_path):
    spec = quick_spec(tmp_path)
    first = start(tmp_path, "submit", str(spec), **SLOW)
    running_trainer(job_dir(spec))
    second = run(tmp_path, "submit", str(spec), timeout=120)
    assert second.returncode == 3
    assert "held by orchestrator pid" in second.stderr and str(first.pid) in second.stderr
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out


def test_a_stopped_trainer_is_killed_and_restarted_after_the_heartbeat_timeout(tmp_path):
    spec = quick_spec(tmp_path, run={"heartbeat_timeout_s": 4})
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    attempt = running_trainer(job)
    wait_for_step(job, 5)
    stopped_at = time.time()
    os.kill(attempt["pid"], signal.SIGSTOP)
    nxt = running_trainer(job, after=attempt["number"], timeout=60)
    assert time.time() - stopped_at < 4 + 10
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    first = state(job)["attempts"][0]
    assert first["reason"].startswith("hung: no heartbeat") and nxt["number"] == 2


def test_a_trainer_failing_at_the_same_step_is_a_crash_loop_not_endless(tmp_path):
    spec = quick_spec(tmp_path, run={"max_restarts": 20, "crash_loop_limit": 3})
    result = run(tmp_path, "submit", str(spec), TIMELLM_JOB_TEST_FAIL_AT_STEP="30")
    assert result.returncode == 1, result.stderr
    doc = state(job_dir(spec))
    assert doc["phase"] == "failed" and "crash loop" in doc["reason"] and "step 30" in doc["reason"]
    assert "failure injected at step 30" in doc["reason"]
    assert len(doc["attempts"]) == 3


def test_completed_job_is_reported_not_retrained_and_exports_predict(completed, reference, tmp_path):
    spec = copy_of(completed, tmp_path)  # trained to completion by submit (the fixture asserts its exit 0)
    job = job_dir(spec)
    again = run(tmp_path, "submit", str(spec))
    assert again.returncode == 0 and "completed already" in again.stderr
    assert len(state(job)["attempts"]) == 1
    status = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)
    for key in ("name", "phase", "epoch", "global_step", "restarts", "attempts", "best", "checkpoints",
                "heartbeat_age_s", "lease"):
        assert key in status
    for key in ("started_at", "ended_at", "pid", "resumed_from", "exit_code", "signal", "reason"):
        assert key in status["attempts"][0]
    assert status["best"]["step"] == reference["best_step"]
    assert status["attempts"][0]["backbone_source"] == "built" and len(status["backbone_cache"]) == 1
    out = tmp_path / "export"
    exported = run(tmp_path, "export-best", str(spec), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    best = json.loads((job / "checkpoints" / status["best"]["checkpoint"] / "manifest.json").read_text())
    import hashlib

    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == \
        best["files"]["model.safetensors"]["sha256"] == reference["best_model"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["mse"] == reference["results"]["test"]["mse"]
    # the export predicts: the documented function, on the last test window, in data units
    from timellm_job.trainer.predict import load_exported

    forecaster = load_exported(str(out), device="cpu")
    import pandas as pd

    table = pd.read_csv(json.loads((out / "config.json").read_text())["data"]["path"])
    raw, raw_dates = table["OT"].to_numpy(), table["date"].tolist()
    history, truth = raw[-60:-12, None], raw[-12:, None]
    forecast = forecaster.predict(history)
    assert forecast.shape == (12, 1) and np.isfinite(forecast).all()
    naive = np.abs(history[-1] - truth).mean()
    assert np.abs(forecast - truth).mean() < 3 * naive + 1.0  # a forecast in the data's units, not noise
    # predict from the job and from the export: the same numbers as load_exported(...).predict
    frame = pd.read_csv(json.loads((out / "config.json").read_text())["data"]["path"]).iloc[-60:-12]
    frame.to_csv(tmp_path / "input.csv", index=False)
    from_job = run(tmp_path, "predict", str(spec), "--input", str(tmp_path / "input.csv"), "--out",
                   str(tmp_path / "forecast.csv"))
    assert from_job.returncode == 0, from_job.stderr
    predicted = pd.read_csv(tmp_path / "forecast.csv")
    assert list(predicted.columns) == ["date", "OT"] and len(predicted) == 12
    assert predicted["date"].iloc[0] == raw_dates[-12]  # the hour after the input's last
    assert np.allclose(predicted["OT"].to_numpy(), forecast[:, 0], rtol=1e-8, atol=1e-9)
    from_export = run(tmp_path, "predict", str(out), "--input", str(tmp_path / "input.csv"))
    assert from_export.returncode == 0 and from_export.stdout == (tmp_path / "forecast.csv").read_text()
    # issue 23, item 12: a history with a blank, an inf or dates that do not increase is refused
    # naming the row and the column (was: blank forecast columns, exit 0)
    from timellm_job.trainer.predict import forecast_csv

    bad = frame.reset_index(drop=True)
    for column, row, value, said in (("OT", 30, float("nan"), "not a finite number"),
                                     ("OT", 5, float("inf"), "not a finite number"),
                                     ("date", 40, bad["date"].iloc[10], "does not come after"),
                                     ("date", 41, bad["date"].iloc[40], "does not come after")):
        broken = bad.copy()
        broken.loc[row, column] = value
        with pytest.raises(ValueError, match=rf"row {row + 2}\b.*column '{column}'.*{said}"):
            forecast_csv(forecaster, broken)
    broken = bad.copy()
    broken.loc[30, "OT"] = float("nan")
    broken.to_csv(tmp_path / "blank.csv", index=False)
    refused = run(tmp_path, "predict", str(out), "--input", str(tmp_path / "blank.csv"))
    assert refused.returncode == 2 and "row 32" in refused.stderr and "'OT'" in refused.stderr
    plot = tmp_path / "loss.png"
    shown = run(tmp_path, "status", str(spec), "--plot", str(plot))
    assert shown.returncode == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    logs = run(tmp_path, "logs", str(spec))
    assert "test mse" in logs.stdout


def test_export_of_a_corrupted_best_exits_1_naming_the_file(completed, tmp_path):
    spec = copy_of(completed, tmp_path)
    job = job_dir(spec)
    best = json.loads(run(tmp_path, "status", str(spec), "--json").stdout)["best"]["checkpoint"]
    target = job / "checkpoints" / best / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(bytes(data))
    out = tmp_path / "export"
    result = run(tmp_path, "export-best", str(spec), "--out", str(out))
    assert result.returncode == 1 and "model.safetensors" in result.stderr
    assert not out.exists()
    verified = run(tmp_path, "status", str(spec), "--json", "--verify")
    assert verified.returncode == 1
    assert [c["valid"] for c in json.loads(verified.stdout)["checkpoints"] if c["id"] == best] == [False]


def test_a_changed_spec_is_refused_on_resume(completed, tmp_path):
    spec = copy_of(completed, tmp_path)
    result = run(tmp_path, "submit", str(spec), "--set", "model.d_model=8", "--set", "train.learning_rate=0.5")
    assert result.returncode == 2
    assert "model.d_model: stored 16, given 8" in result.stderr and "train.learning_rate" in result.stderr


def test_same_job_on_gcs_through_the_emulator(reference, gcs_server, tmp_path):
    from tests import servers

    root = f"gs://{servers.GCS_BUCKET}/e2e-{time.time_ns()}"
    spec = quick_spec(tmp_path, storage={"root": root, "options": servers.gcs_options(gcs_server)})
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    from timellm_job.storage import job_store
    from timellm_job.storage.documents import read_json

    store = job_store(root, "quick", servers.gcs_options(gcs_server))
    def at_step_15() -> dict | None:
        doc = read_json(store, "state.json") or {}
        return doc if (doc.get("heartbeat") or {}).get("step", 0) >= 15 else None

    doc = wait_until(at_step_15, "step 15 in state.json on GCS", poll=0.3, alive=[proc])
    os.kill(doc["attempts"][-1]["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    status = json.loads(run(tmp_path, "status", str(spec), "--json", "--verify").stdout)
    assert status["phase"] == "completed" and status["restarts"] == 1
    assert all(c["valid"] for c in status["checkpoints"])
    results = read_json(store, "results.json")
    assert results["test"] == reference["results"]["test"]
    best = [c for c in status["checkpoints"] if c["kind"] == "best"][0]
    from timellm_job.storage import list_checkpoints

    manifest = [m for m in list_checkpoints(store).committed if m.id == best["id"]][0]
    assert manifest.files["model.safetensors"].sha256 == reference["best_model"]


def test_a_preemption_notice_from_the_metadata_server_preempts_the_job(tmp_path):
    """A fake GCE metadata server on 127.0.0.1 says TRUE: the job stops as on SIGTERM."""
    import http.server
    import threading

    answer = {"body": b"FALSE"}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            assert self.headers.get("Metadata-Flavor") == "Google"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/preempted"
    spec = quick_spec(tmp_path, run={"preemption_notice": {"provider": "gce", "url": url, "interval_s": 0.2}})
    job = job_dir(spec)
    proc = start(tmp_path, "submit", str(spec), **SLOW)
    running_trainer(job)
    wait_for_step(job, 10)
    assert proc.poll() is None  # FALSE: nothing happens
    answer["body"] = b"TRUE"
    out, _ = proc.communicate(timeout=60)
    server.shutdown()
    assert proc.returncode == 143, out
    assert "preemption notice" in out
    doc = state(job)
    assert doc["phase"] == "preempted"
    end = doc["attempts"][-1]["end_step"]  # committed: a preempt checkpoint, or the step's own
    assert any(c["kind"] in ("preempt", "step") and c["step"] == end for c in doc["checkpoints"])
