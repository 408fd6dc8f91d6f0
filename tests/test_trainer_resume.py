"""Resume equivalence of the trainer alone: SIGKILL at random moments (checkpoint writes
included), SIGTERM, a crash: every resumed run ends bit-identical to one uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import wait_until
from tests.jobfiles import copy_of, final_state, job_dir, quick_spec
from timellm_job.storage import job_store, list_checkpoints, verify

REPO = Path(__file__).resolve().parents[1]


def trainer(spec: Path, attempt: int = 1, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "timellm_job.trainer", "run", str(spec), "--attempt", str(attempt)],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_uninterrupted_runs_are_deterministic(completed, reference):
    """Two uninterrupted runs of the job, each trained once per suite: one by the trainer alone
    (``reference``), one through ``submit`` (``completed``)."""
    assert final_state(completed[1] / "quick") == reference


def test_random_sigkills_resume_bit_identical(reference, tmp_path):
    spec = quick_spec(tmp_path)
    rng = random.Random(1234)
    kills = attempt = 0
    # slow writes so that some kills land inside a checkpoint write
    env = {"TIMELLM_JOB_TEST_WRITE_DELAY_S": "0.05", "TIMELLM_JOB_TEST_STEP_DELAY_S": "0.1"}
    while True:
        attempt += 1
        proc = trainer(spec, attempt, env)
        if kills < 6:
            try:
                proc.wait(timeout=rng.uniform(3.0, 6.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                kills += 1
                continue
        else:
            proc.wait(300)
        assert proc.returncode == 0, proc.stderr.read()
        break
    assert kills >= 4
    assert final_state(job_dir(spec)) == reference
    job = job_store(str(tmp_path / "root"), "quick")
    for m in list_checkpoints(job).committed:
        assert verify(job, m) == []


def test_sigterm_commits_a_preempt_checkpoint_and_exits_143(reference, tmp_path):
    spec = quick_spec(tmp_path)
    proc = trainer(spec)
    job = job_store(str(tmp_path / "root"), "quick")
    wait_until(lambda: any(m.kind == "step" for m in list_checkpoints(job).committed), "a step checkpoint",
               poll=0.2, alive=[proc])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    # a preempt checkpoint of the step it stopped at; or none, when that step was being saved anyway
    said = re.search(r"preempted by signal 15: (committed a preempt checkpoint at step (\d+)|step (\d+) is committed "
                     r"already \(no second checkpoint of it\))", err)
    assert said, err
    stop_step = int(said.group(2) or said.group(3))
    preempts = [m for m in list_checkpoints(job).committed if m.kind == "preempt"]
    at_stop = [m for m in list_checkpoints(job).committed if m.step == stop_step and m.kind in ("preempt", "step")]
    assert len(at_stop) == 1 and verify(job, at_stop[0]) == []
    assert len(preempts) == (1 if said.group(2) else 0)
    proc = trainer(spec, 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from checkpoint {at_stop[0].id}" in err
    assert final_state(job_dir(spec)) == reference


def test_corrupt_newest_checkpoint_falls_back_and_still_ends_identical(reference, tmp_path):
    spec = quick_spec(tmp_path)
    proc = trainer(spec, env={"TIMELLM_JOB_TEST_FAIL_AT_STEP": "40"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "failure injected at step 40" in err
    job = job_store(str(tmp_path / "root"), "quick")
    newest = list_checkpoints(job).committed[0]
    target = job_dir(spec) / "checkpoints" / newest.id / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    proc = trainer(spec, 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"skipping checkpoint {newest.id}" in err
    assert final_state(job_dir(spec)) == reference


def test_completed_job_is_not_trained_again(completed, tmp_path):
    spec = copy_of(completed, tmp_path)
    before = json.loads((job_dir(spec) / "results.json").read_text())
    proc = trainer(spec, 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "complete already" in err
    assert json.loads((job_dir(spec) / "results.json").read_text()) == before


def test_safetensors_views_read_what_the_zero_copy_writer_wrote_and_refuse_bad_offsets():

    import struct

    import torch
    from safetensors.torch import load as st_load

    from timellm_job.trainer import safetensors_parts

    g = torch.Generator().manual_seed(0)
    src = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64),
           "c": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g), "d": torch.randn(4, generator=g).bfloat16(),
           "e": torch.empty(0, 3), "f": torch.randn(2, generator=g).double()}
    buf = bytearray(b"".join(bytes(p) for p in safetensors_parts.parts(src)))
    got = safetensors_parts.tensors(buf)
    ref = st_load(bytes(buf))
    assert set(got) == set(src) == set(ref)
    for k in src:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]) and torch.equal(ref[k], src[k])
    got["a"][0, 0] = 42.0  # a view of the buffer, not a copy
    assert safetensors_parts.tensors(buf)["a"][0, 0] == 42.0
    (n,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(bytes(buf[8:8 + n]))
    header["a"]["data_offsets"][1] += 4  # no longer matches its shape
    bad_header = json.dumps(header).encode()
    bad = bytearray(struct.pack("<Q", len(bad_header)) + bad_header + buf[8 + n:])
    with pytest.raises(ValueError, match="data offsets"):
        safetensors_parts.tensors(bad)
    with pytest.raises(ValueError):
        safetensors_parts.tensors(bytearray(b"\x01\x00"))


def test_a_preemption_at_a_step_just_saved_writes_no_second_checkpoint_of_it(tmp_path):
    """Issue 15: the step being preempted is committed (or in flight) already: finish that write,
    commit nothing more, exit 143; a preemption one step later does write a preempt checkpoint."""
    from timellm_job.jobs import load_spec
    from timellm_job.trainer.data import train_batches
    from timellm_job.trainer.loop import Trainer

    t = Trainer(load_spec(quick_spec(tmp_path)), background_saves=True)
    t.build()
    t.resume()
    t.plan_memory()
    batches = train_batches(t.parts.splits.train, t.spec.train.batch_size, 0, 0)
    for _ in range(2):
        _, (x, y, _) = next(batches)
        t.optimizer_step(x, y)
        t.state.progress.global_step += 1
        t.state.progress.batch += 1
    t.save("step")  # in flight on the saver's thread
    assert t.preempted(signal.SIGTERM) == 143
    kinds = [(m.step, m.kind) for m in list_checkpoints(t.job).committed]
    assert kinds == [(2, "step")]
    _, (x, y, _) = next(batches)
    t.optimizer_step(x, y)
    t.state.progress.global_step += 1
    t.state.progress.batch += 1
    assert t.preempted(signal.SIGTERM) == 143
    kinds = [(m.step, m.kind) for m in list_checkpoints(t.job).committed]
    assert kinds == [(3, "preempt"), (2, "step")]
