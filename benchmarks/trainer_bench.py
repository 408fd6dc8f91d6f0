"""Trainer benchmarks on the Llama-3-sized trainable state (vocabulary 128,256 -> 1,000 prototypes;
a small random backbone, so it runs on a CPU).

    python -m benchmarks.trainer_bench resume  [--runs 5]
    python -m benchmarks.trainer_bench baseline          # the tiny job vs repeat-the-last-value

(Saves against no saves, and against accelerate's: benchmarks/peers_bench.py stall.)
resume: time to the first step after resuming at the last batch of an epoch divided by at its
first batch. baseline: the tiny job's test MSE/MAE (a fresh run) beside the
naive forecast on the same test windows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import TINY_SPEC, machine

LLAMA3_VOCAB = ["--set", "model.backbone.random.vocab_size=128256", "--set", "model.num_tokens=1000",
                "--set", "data.percent=5"]


def trainer_for(root: str, background: bool, sets: list[str]):
    from timellm_job.jobs import load_spec
    from timellm_job.trainer.loop import Trainer

    pairs = tuple(sets[i + 1] for i in range(0, len(sets), 2))
    spec = load_spec(TINY_SPEC, root=root, sets=pairs)
    t = Trainer(spec, background_saves=background)
    t.build()
    return t


def step(t, batches) -> None:
    import torch

    b, (x, y, _) = next(batches)
    out = t.state.model(x)
    loss = torch.nn.functional.mse_loss(out, y)
    t.state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.state.optimizer.step()
    t.state.scheduler.step()
    t.state.progress.global_step += 1
    t.state.progress.batch = b + 1


def resume(runs: int) -> None:
    from timellm_job.storage import load_newest
    from timellm_job.trainer import checkpoint_state
    from timellm_job.trainer.data import train_batches

    root = tempfile.mkdtemp(prefix="resume-bench-", dir="/var/tmp")
    try:
        t = trainer_for(root, background=False, sets=LLAMA3_VOCAB)
        n = t.parts.steps_per_epoch
        times = {}
        for label, batch in (("first batch", 0), ("last batch", n - 1)):
            samples = []
            for r in range(runs):
                t.state.progress.epoch, t.state.progress.batch, t.state.progress.global_step = 1, batch, n + batch + r * 0
                shutil.rmtree(Path(root) / t.spec.name / "checkpoints", ignore_errors=True)
                t.save("step", wait=True)
                start = time.perf_counter()
                loaded = load_newest(t.job)
                snap = checkpoint_state.read_files(loaded.files)
                p = checkpoint_state.restore(snap, t.state.model, t.state.optimizer, t.state.scheduler)
                t.state.progress = p
                step(t, train_batches(t.parts.splits.train, t.spec.train.batch_size, t.spec.train.seed, p.epoch, p.batch))
                samples.append(time.perf_counter() - start)
            times[label] = statistics.median(samples)
        print(f"\nmachine: {machine()}; {n} batches per epoch; load + verify + restore + first step; "
              f"median of {runs} runs\n")
        print("| resume at | time to first step (s) | ratio | target |")
        print("| --- | ---: | ---: | --- |")
        first = times["first batch"]
        for label, v in times.items():
            print(f"| {label} of an epoch | {v:.2f} | {v / first:.3f} | {'<= 1.05' if label == 'last batch' else ''} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def baseline() -> None:
    import numpy as np
    import torch

    from timellm_job.jobs import load_spec
    from timellm_job.trainer.data import eval_batches, load_splits

    root = tempfile.mkdtemp(prefix="tiny-", dir="/var/tmp")
    try:
        start = time.time()
        subprocess.run([sys.executable, "-m", "timellm_job.trainer", "run", str(TINY_SPEC), "--root", root], check=True,
                       stderr=subprocess.DEVNULL)
        wall = time.time() - start
        spec = load_spec(TINY_SPEC, root=root)
        results = json.loads((Path(root) / spec.name / "results.json").read_text())
        splits = load_splits(spec.data)
        se = ae = se_raw = ae_raw = count = 0.0
        for x, y, ch in eval_batches(splits.test, 512):
            pred = x[:, -1:, :].expand_as(y)  # repeat the last value
            se += float(((pred - y) ** 2).sum())
            ae += float((pred - y).abs().sum())
            std = torch.as_tensor(splits.scaler.std, dtype=torch.float32)[ch].view(-1, 1, 1)
            se_raw += float((((pred - y) * std) ** 2).sum())
            ae_raw += float(((pred - y) * std).abs().sum())
            count += y.numel()
        test = results["test"]
        print(f"\nmachine: {machine()}; tiny job ({spec.train.epochs} epochs, {results['global_step']} steps) "
              f"trained in {wall:.0f} s wall (process start to exit)\n")
        print("| ETTh1 test, 96 -> 24, M, 10% of training | MSE | MAE | MSE (data units) | MAE (data units) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print(f"| Time-LLM tiny job (timellm-job) | {test['mse']:.4f} | {test['mae']:.4f} | "
              f"{test['mse_data_units']:.3f} | {test['mae_data_units']:.3f} |")
        print(f"| repeat the last value | {se / count:.4f} | {ae / count:.4f} | {se_raw / count:.3f} | "
              f"{ae_raw / count:.3f} |")
        assert np.isfinite(se)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["resume", "baseline"])
    ap.add_argument("--runs", type=int, default=None)
    a = ap.parse_args()
    if a.what == "resume":
        resume(a.runs or 5)
    else:
        baseline()


if __name__ == "__main__":
    main()
