"""Time-series data: the ETT files with the paper's splits, scaling, windows and a resumable order.

Invariants:
- Splits (rows): ETTh train [0, 8640), validation [8640 - seq_len, 11520), test
  [11520 - seq_len, 14400); ETTm the same in 15-minute rows (x4); ``custom`` 70/10/20.
- The StandardScaler is fit on the full training rows only; ``percent`` then keeps the first
  ``(train_end - seq_len) * percent // 100 + seq_len`` training rows (few-shot).
- Channel independence: with features M or S a sample is one variate's window; with MS a
  sample holds every variate and the target is the last column.
- The training order of epoch e is a permutation drawn from a generator seeded by (seed, e):
  resuming at batch k of epoch e costs the same as starting it; no skipped batch is built.
- Bad data is a :class:`DataError` naming the spec field.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import torch

HOURS_PER_MONTH = 30 * 24


class DataError(ValueError):
    """Data that does not fit the spec; the message names the field."""


@dataclass
class Scaler:
    mean: np.ndarray
    std: np.ndarray

    def inverse(self, values: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """Undo scaling; ``channels`` gives each sample's column (channel-independent samples)."""
        mean = torch.as_tensor(self.mean, dtype=values.dtype)[channels]
        std = torch.as_tensor(self.std, dtype=values.dtype)[channels]
        return values * std.view(-1, *([1] * (values.dim() - 1))) + mean.view(-1, *([1] * (values.dim() - 1)))


def read_frame(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Read the CSV through fsspec (local, gs://, s3://, https://)."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"data.path: no such file: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any fsspec backend error is a readability problem
        raise DataError(f"data.path: cannot read {path}: {exc}") from None
    try:
        return pd.read_csv(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"data.path: {path} is not a readable CSV: {exc}") from None


def data_options(spec) -> dict | None:
    """``storage.options`` apply to ``data.path`` when both are on the same kind of store."""
    from timellm_job.jobs.spec import data_storage_options

    return data_storage_options(spec)


def borders(kind: str, n_rows: int, seq_len: int) -> tuple[list[int], list[int]]:
    if kind in ("ETTh1", "ETTh2", "ETTm1", "ETTm2"):
        unit = HOURS_PER_MONTH * (4 if kind.startswith("ETTm") else 1)
        start = [0, 12 * unit - seq_len, 16 * unit - seq_len]
        end = [12 * unit, 16 * unit, 20 * unit]
    else:
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        start = [0, n_train - seq_len, n_rows - n_test - seq_len]
        end = [n_train, n_train + n_val, n_rows]
    if end[2] > n_rows:
        raise DataError(f"data.kind: {kind} needs {end[2]} rows, the file has {n_rows}")
    return start, end


class WindowSet:
    """All (input, target) windows of one split, as views of one tensor (no copies)."""

    def __init__(self, values: torch.Tensor, seq_len: int, pred_len: int, per_channel: bool, split: str):
        self.values, self.seq_len, self.pred_len, self.per_channel = values, seq_len, pred_len, per_channel
        self.n_windows = values.shape[0] - seq_len - pred_len + 1
        self.n_channels = values.shape[1]
        if self.n_windows < 1:
            raise DataError(f"data.seq_len: the {split} split has {values.shape[0]} rows, fewer than "
                            f"seq_len + pred_len = {seq_len + pred_len}")
        self._full = values.unfold(0, seq_len + pred_len, 1)  # [windows, C, seq+pred]

    def __len__(self) -> int:
        return self.n_windows * (self.n_channels if self.per_channel else 1)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, seq_len, C'], y [B, pred_len, C'], channel of each sample [B] (-1 for all)."""
        if self.per_channel:
            win, ch = idx % self.n_windows, idx // self.n_windows
            full = self._full[win, ch].unsqueeze(-1)  # [B, seq+pred, 1]
        else:
            win, ch = idx, torch.full_like(idx, -1)
            full = self._full[idx].transpose(1, 2)  # [B, seq+pred, C]
        return full[:, : self.seq_len].contiguous(), full[:, self.seq_len:].contiguous(), ch


@dataclass
class Splits:
    train: WindowSet
    val: WindowSet
    test: WindowSet
    scaler: Scaler
    columns: list[str]
    target_index: int


def load_splits(data_spec, storage_options: dict | None = None) -> Splits:
    """Read, split, scale and window the data of a DataSpec."""
    frame = read_frame(data_spec.path, storage_options)
    if data_spec.kind == "custom" and data_spec.date_column not in frame.columns:
        raise DataError(f"data.date_column: no column {data_spec.date_column!r} in {data_spec.path}")
    columns = [c for c in frame.columns if c != data_spec.date_column]
    if data_spec.target not in columns:
        raise DataError(f"data.target: no column {data_spec.target!r} in {data_spec.path} "
                        f"(columns: {', '.join(columns)})")
    if data_spec.features == "S":
        columns = [data_spec.target]
    else:  # the target last, as the MS head predicts the last column
        columns = [c for c in columns if c != data_spec.target] + [data_spec.target]
    try:
        values = frame[columns].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"data.path: non-numeric values in {data_spec.path}: {exc}") from None
    if not np.isfinite(values).all():
        raise DataError(f"data.path: {data_spec.path} has missing or infinite values")
    start, end = borders(data_spec.kind, len(values), data_spec.seq_len)
    if start[1] < 0:
        raise DataError(f"data.seq_len: {data_spec.seq_len} is longer than the training split ({end[0]} rows)")
    train_rows = values[start[0]:end[0]]
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
        std = np.where(std == 0, 1.0, std)
        scaled64 = (values - mean) / std
        scaled32 = scaled64.astype(np.float32)
    for i, column in enumerate(columns):  # finite statistics and values after scaling, or a clear no
        if not (np.isfinite(mean[i]) and np.isfinite(std[i]) and np.isfinite(scaled32[:, i]).all()):
            raise DataError(f"data.path: column {column!r} of {data_spec.path}: its values (up to "
                            f"{np.abs(values[:, i]).max():.3g}) are too large to scale (mean {mean[i]:.3g}, "
                            f"spread {std[i]:.3g}): training would see inf or NaN at its first step")
    scaled = torch.from_numpy(scaled32)
    train_end = (end[0] - data_spec.seq_len) * data_spec.percent // 100 + data_spec.seq_len
    per_channel = data_spec.features in ("M", "S")
    make = lambda a, b, split: WindowSet(scaled[a:b], data_spec.seq_len, data_spec.pred_len, per_channel, split)  # noqa: E731
    return Splits(make(start[0], train_end, "training"), make(start[1], end[1], "validation"),
                  make(start[2], end[2], "test"), Scaler(mean, std), columns, len(columns) - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation seeded by (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def train_batches(windows: WindowSet, batch_size: int, seed: int, epoch: int, start: int = 0,
                  rank: int = 0, world: int = 1):
    """Yield (index, batch) from batch ``start`` of the epoch on; full batches only (drop_last).

    ``batch_size`` is the global batch; with ``world`` processes, rank r gets the r-th of
    ``world`` equal slices of each global batch (so the processes together see exactly the
    batches one process would, and resuming at any batch costs the same as at the first)."""
    order = epoch_order(len(windows), seed, epoch)
    n_batches = len(windows) // batch_size
    per = batch_size // world
    for b in range(start, n_batches):
        first = b * batch_size + rank * per
        yield b, windows.batch(order[first:first + per])


def eval_batches(windows: WindowSet, batch_size: int, rank: int = 0, world: int = 1):
    """Every sample once, in order, the last batch possibly short (no dropped samples); with
    ``world`` processes, rank r gets batches r, r + world, ..."""
    for s in range(rank * batch_size, len(windows), batch_size * world):
        yield windows.batch(torch.arange(s, min(s + batch_size, len(windows))))


def eval_rounds(windows: WindowSet, batch_size: int, world: int = 1) -> int:
    """How many batches the busiest of ``world`` processes evaluates."""
    n_batches = -(-len(windows) // batch_size)
    return -(-n_batches // world)
