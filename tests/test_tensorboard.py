"""TensorBoard event files are written through storage (any store: here the GCS emulator) as
whole files, and TensorBoard's own reader reads them back in order across flushes and attempts."""

from __future__ import annotations

import time

import pytest

from timellm_job.storage import job_store
from timellm_job.trainer.tensorboard import TensorBoardLog, available

pytestmark = pytest.mark.skipif(not available(), reason="the tensorboard extra is not installed")


def test_event_files_written_through_a_gcs_store_read_back_by_tensorboard(gcs_server, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests import servers

    job = job_store(f"gs://{servers.GCS_BUCKET}/tb-{time.time_ns()}", "job", servers.gcs_options(gcs_server))
    first = TensorBoardLog(job, attempt=1)
    first.text("attempts", "attempt 1 started at step 0, from the start", 0)
    for step in range(1, 6):
        first.add({"step": step, "loss": 1.0 / step, "lr": 0.01, "time": 1000.0 + step})
    first.flush()
    first.add({"step": 6, "loss": 0.1, "time": 1006.0})
    first.add({"step": 6, "val_loss": 0.5, "val_mae": 0.6, "time": 1006.5})
    first.flush()
    second = TensorBoardLog(job, attempt=2)  # a restart that resumed at step 4
    second.text("attempts", "attempt 2 started at step 4, resumed from checkpoint 000000004-step", 4)
    for step in range(5, 9):
        second.add({"step": step, "loss": 2.0 / step, "time": 2000.0 + step})
    second.add({"step": 8, "test_mse": 0.25, "test_mae": 0.4})
    second.flush()
    files = sorted(name for name, _, _ in job.list_dir("tb"))
    assert len(files) == 3 and all(".tfevents." in f for f in files)
    local = tmp_path / "tb"
    local.mkdir()
    for name in files:  # TensorBoard reads gs:// itself given credentials; here a local copy of the bytes
        (local / name).write_bytes(job.read_bytes(f"tb/{name}"))
    board = EventAccumulator(str(local))
    board.Reload()
    losses = {e.step: round(e.value, 6) for e in board.Scalars("train/loss")}
    assert losses == {1: 1.0, 2: 0.5, 3: round(1 / 3, 6), 4: 0.25, 5: 0.4, 6: round(2 / 6, 6), 7: round(2 / 7, 6),
                      8: 0.25}
    assert [(e.step, e.value) for e in board.Scalars("val/mse")] == [(6, 0.5)]
    assert board.Scalars("test/mse")[0].value == pytest.approx(0.25)
    texts = [t.tensor_proto.string_val[0].decode() for t in board.Tensors("attempts")]
    assert texts[-1].startswith("attempt 2 started at step 4")


def test_nothing_is_written_when_disabled(tmp_path):
    job = job_store(str(tmp_path), "job")
    log = TensorBoardLog(job, attempt=1, enabled=False)
    log.add({"step": 1, "loss": 1.0})
    log.flush()
    assert not (tmp_path / "job" / "tb").exists()
