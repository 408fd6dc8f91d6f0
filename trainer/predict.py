"""Prediction from an export (``timellm-job export-best --out DIR``).

    from timellm_job.trainer.predict import load_exported
    forecaster = load_exported("exported/")
    forecast = forecaster.predict(history)   # history [seq_len, n_columns] in the data's units

    python -m timellm_job.trainer.predict EXPORT_DIR --input CSV [--out CSV]   # (timellm-job predict)

From a CSV: the columns the model was trained on are taken by name from the input's last
``seq_len`` rows; the output holds the ``pred_len`` rows after them (the forecast columns: every
column for features M, the target for S and MS), after a date column continued at the input's
own step when the input has one.

Invariants: the model is rebuilt from ``config.json`` alone (the backbone as the job built it:
the same random seed, or the same pretrained folder or hub id) and loaded with the exported
parameters after their sha256 is checked; inputs and outputs are in the data's own units (the
exported scaling is applied and undone).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from timellm_job.jobs.spec import DataSpec, ModelSpec
from timellm_job.storage import open_store
from timellm_job.trainer.backbone import default_device, load_backbone
from timellm_job.trainer.checkpoint_state import load_trainable, tensors_from
from timellm_job.trainer.model import TimeLLM


class Forecaster:
    def __init__(self, model: TimeLLM, config: dict, device: str):
        self.model, self.config, self.device = model, config, device
        sc = config["scaling"]
        self.columns, self.mean, self.std = sc["columns"], np.asarray(sc["mean"]), np.asarray(sc["std"])
        self.seq_len, self.pred_len = config["data"]["seq_len"], config["data"]["pred_len"]
        self.features = sc["features"]

    def predict(self, history: np.ndarray) -> np.ndarray:
        """history [seq_len, C] or [B, seq_len, C] (C = the exported columns, target last) ->
        forecast [pred_len, C'] or [B, pred_len, C'] in the data's units (C' = 1 for MS)."""
        x = np.asarray(history, dtype=np.float64)
        single = x.ndim == 2
        x = x[None] if single else x
        if x.shape[1:] != (self.seq_len, len(self.columns)):
            raise ValueError(f"history must be [{self.seq_len}, {len(self.columns)}] ({', '.join(self.columns)}), "
                             f"got {list(x.shape[1:])}")
        scaled = torch.from_numpy(((x - self.mean) / self.std).astype(np.float32))
        self.model.eval()
        with torch.no_grad():  # the model treats every column as its own series (channel independence)
            out = self.model(scaled.to(self.device)).float().cpu().numpy().astype(np.float64)
        if self.features == "MS":
            out = out[..., -1:] * self.std[-1] + self.mean[-1]
        else:
            out = out * self.std + self.mean
        return out[0] if single else out


def load_exported(url: str, device: str = "auto", storage_options: dict | None = None) -> Forecaster:
    store = open_store(url, storage_options)
    config = json.loads(store.read_bytes("config.json"))
    data, digest = store.read_file("model.safetensors")
    if digest != config["sha256"]["model.safetensors"]:
        raise ValueError(f"{store.url_of('model.safetensors')}: sha256 does not match config.json")
    model_spec, data_spec = ModelSpec.model_validate(config["model"]), DataSpec.model_validate(config["data"])
    device = default_device(device)
    backbone = load_backbone(model_spec, device) if model_spec.ablation == "none" else None
    model = TimeLLM(model_spec, data_spec, backbone).to(device)
    load_trainable(model, tensors_from(data))
    return Forecaster(model, config, device)


def forecast_csv(forecaster: Forecaster, frame, date_column: str = "date"):
    """The forecast after ``frame``'s last ``seq_len`` rows, as a DataFrame (see the module doc)."""
    import pandas as pd

    missing = [c for c in forecaster.columns if c not in frame.columns]
    if missing:
        raise ValueError(f"--input: no column {', '.join(map(repr, missing))} (the model reads "
                         f"{', '.join(forecaster.columns)})")
    if len(frame) < forecaster.seq_len:
        raise ValueError(f"--input: {len(frame)} rows, the model needs the last {forecaster.seq_len}")
    window = frame.iloc[-forecaster.seq_len:]
    try:
        history = window[forecaster.columns].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"--input: non-numeric values in the last {forecaster.seq_len} rows: {exc}") from None
    bad = np.argwhere(~np.isfinite(history))
    if len(bad):
        row, col = bad[0]
        value = window[forecaster.columns[col]].iloc[row]
        raise ValueError(f"--input: row {window.index[row] + 2} (the header is row 1), column "
                         f"{forecaster.columns[col]!r}: {value!r} is not a finite number; the model reads the last "
                         f"{forecaster.seq_len} rows, every value a number")
    out = forecaster.predict(history)
    names = forecaster.columns if forecaster.features == "M" else forecaster.columns[-1:]
    result = pd.DataFrame(out, columns=names)
    if date_column in frame.columns:
        try:
            dates = pd.to_datetime(window[date_column])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--input: column {date_column!r}: not dates: {exc}") from None
        steps = dates.diff().iloc[1:]
        if len(steps) and not (steps > pd.Timedelta(0)).all():
            at = int(np.argmax(~(steps > pd.Timedelta(0)).to_numpy())) + 1
            raise ValueError(f"--input: row {window.index[at] + 2}, column {date_column!r}: "
                             f"{window[date_column].iloc[at]!r} does not come after the row before it "
                             f"({window[date_column].iloc[at - 1]!r}); the dates must increase, so the "
                             "forecast's dates can continue them")
        step = dates.diff().iloc[-1]
        future = [dates.iloc[-1] + step * (i + 1) for i in range(forecaster.pred_len)]
        result.insert(0, date_column, [d.strftime("%Y-%m-%d %H:%M:%S") for d in future])
    return result


def main(argv=None) -> int:
    import argparse
    import os
    import sys

    import pandas as pd

    ap = argparse.ArgumentParser(prog="python -m timellm_job.trainer.predict")
    ap.add_argument("export")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    try:
        forecaster = load_exported(a.export, device="auto")
        frame = pd.read_csv(a.input)
        result = forecast_csv(forecaster, frame, forecaster.config["data"].get("date_column", "date"))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = result.to_csv(index=False, float_format="%.10g")
    if a.out:
        folder, name = os.path.split(a.out if "://" in a.out else os.path.abspath(a.out))
        open_store(folder).replace(name, text.encode())
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
