"""Prediction from an export (``timellm-job export-best --out DIR``).

    from trainer.predict import load_exported
    forecaster = load_exported("exported/")
    forecast = forecaster.predict(history)   # history [seq_len, n_columns] in the data's units

Invariants: the model is rebuilt from ``config.json`` alone (the backbone as the job built it:
the same random seed, or the same pretrained folder or hub id) and loaded with the exported
parameters after their sha256 is checked; inputs and outputs are in the data's own units (the
exported scaling is applied and undone).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from jobs.spec import DataSpec, ModelSpec
from storage import open_store
from trainer.backbone import default_device, load_backbone
from trainer.model import TimeLLM
from trainer.state import load_trainable, tensors_from


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
    backbone = load_backbone(model_spec, device)
    model = TimeLLM(model_spec, data_spec, backbone).to(device)
    load_trainable(model, tensors_from(data))
    return Forecaster(model, config, device)
