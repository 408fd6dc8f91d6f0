"""The data follow the paper's splits, scaling and few-shot rule; the order resumes at O(1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.jobfiles import ETTH1
from timellm_job.jobs.spec import DataSpec
from timellm_job.trainer.data import DataError, borders, epoch_order, load_splits, train_batches


def spec(**kw):
    base = {"path": str(ETTH1), "kind": "ETTh1", "features": "M", "seq_len": 96, "label_len": 48,
            "pred_len": 24, "percent": 100}
    return DataSpec.model_validate({**base, **kw})


def test_etth_borders_follow_the_paper():
    start, end = borders("ETTh1", 17420, 96)
    assert start == [0, 8640 - 96, 11520 - 96] and end == [8640, 11520, 14400]
    start, end = borders("ETTm1", 69680, 96)
    assert end == [4 * 8640, 4 * 11520, 4 * 14400]


def test_scaler_is_fit_on_training_rows_only_and_percent_keeps_the_first_rows():
    full = load_splits(spec())
    few = load_splits(spec(percent=10))
    raw = pd.read_csv(ETTH1).drop(columns=["date"])
    train = raw.iloc[:8640].to_numpy()
    cols = [c for c in raw.columns if c != "OT"] + ["OT"]
    assert full.columns == cols
    np.testing.assert_allclose(full.scaler.mean, raw[cols].iloc[:8640].mean().to_numpy())
    np.testing.assert_allclose(few.scaler.mean, full.scaler.mean)  # the scaler ignores percent
    rows = (8640 - 96) * 10 // 100 + 96
    assert few.train.n_windows == rows - 96 - 24 + 1
    assert len(few.train) == few.train.n_windows * 7  # channel independence: a variate per sample
    assert train.shape == (8640, 7)


def test_windows_are_the_right_rows_of_the_right_channel():
    s = load_splits(spec(percent=10))
    n = s.train.n_windows
    x, y, ch = s.train.batch(torch.tensor([0, n + 5]))
    assert ch.tolist() == [0, 1]
    vals = s.train.values
    assert torch.equal(x[1, :, 0], vals[5:101, 1]) and torch.equal(y[1, :, 0], vals[101:125, 1])


def test_ms_keeps_all_columns_and_s_only_the_target():
    ms = load_splits(spec(features="MS"))
    x, y, ch = ms.val.batch(torch.tensor([0]))
    assert x.shape == (1, 96, 7) and ch.tolist() == [-1]
    s = load_splits(spec(features="S"))
    assert s.columns == ["OT"] and len(s.train) == s.train.n_windows


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    s = load_splits(spec(percent=5))
    full = [(b, x) for b, (x, _, _) in train_batches(s.train, 32, seed=7, epoch=3)]
    tail = [(b, x) for b, (x, _, _) in train_batches(s.train, 32, seed=7, epoch=3, start=10)]
    assert [b for b, _ in tail] == [b for b, _ in full[10:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full[10:], tail, strict=True))
    assert not torch.equal(epoch_order(100, 7, 3), epoch_order(100, 7, 4))


@pytest.mark.parametrize("kw, field", [({"seq_len": 9000}, "data.seq_len"), ({"target": "nope"}, "data.target"),
                                       ({"path": "/no/such.csv"}, "data.path")])
def test_data_that_does_not_fit_names_the_field(kw, field):
    with pytest.raises(DataError, match=field):
        load_splits(spec(**kw))
