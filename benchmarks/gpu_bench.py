"""The NF4 Llama-3-8B-shaped Time-LLM job on one GPU: memory plans under T4 / L4 memory caps,
compute dtypes, gradient checkpointing, a real out-of-memory through the CLI, and the cost of
background saves (and, with --tiny, all of it on a CPU at a tiny shape: the test suite runs it).

    python -m benchmarks.gpu_bench                  # on a GPU: everything, about 6-8 minutes
    python -m benchmarks.gpu_bench --parts plan     # plan | loss | oom | saves, comma-separated
    python -m benchmarks.gpu_bench --tiny           # on a CPU, a tiny shape

Everything runs through the trainer's own code: ``trainer.loop.Trainer`` builds the job (data
from a generated 7-column CSV, the backbone with random weights of Llama-3-8B's shape: hidden
4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128,256, quantized to NF4
by the trainer's loader), plans memory with ``trainer.memory.decide`` and its real probe, and
steps with ``Trainer.optimizer_step`` (micro-batches, loss scaling, checkpointing). Time-LLM at
seq_len 512, pred_len 96, global batch 24, d_model 32, d_ff 128, 1,000 text prototypes.

Parts:
- plan: under memory caps of 15 GiB (a T4, fp16: no bf16 below compute capability 8.0) and 22 GiB
  (an L4 / A10G, bf16), emulated with ``torch.cuda.set_per_process_memory_fraction``, and
  uncapped (bf16): the plan ``micro_batch_size: auto`` chooses, its peak memory, step time and
  samples/s; then bf16 and fp16 at the full batch with and without gradient checkpointing.
- loss: 50 steps of fp16 against bf16 from the same weights on the same batches; loss per step
  and the steps the fp16 loss scaler skipped.
- oom: a short job through ``timellm-job submit`` under the 15 GiB cap (applied in the trainer by
  the test-only wrapper tests/faults) with a plan forced too large (micro-batch 24, no
  checkpointing, fp16): the attempt must end with the diagnosis and the job fail at once (exit
  1); then the same job resubmitted with ``auto`` must plan and complete. On a CPU the
  out-of-memory is injected instead (TIMELLM_TEST_OOM_ABOVE_MICRO).
- saves: training with a checkpoint every 20 steps through the trainer's own save path,
  background / synchronous / none; the save stall, commit and resume; and a torch.profiler
  window of steps with a save in flight against one without (host syncs, copies, pinned
  allocations, and each step's time), to find what background saves still cost.

A JSON summary is printed as the last line and written to $OUT/gpu_bench.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import with_faults
from timellm_job.jobs.spec_files import parse_spec
from timellm_job.storage import load_newest
from timellm_job.trainer import checkpoint_state, memory
from timellm_job.trainer.components import per_process_batch
from timellm_job.trainer.data import train_batches
from timellm_job.trainer.grad_checkpointing import set_gradient_checkpointing
from timellm_job.trainer.loop import Trainer
from timellm_job.trainer.memory_steps import probe_peak
from timellm_job.trainer.saver import CheckpointSaver

REPO = Path(__file__).resolve().parents[1]

GiB = memory.GiB
LLAMA3_8B = {"family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256}
TINY = {"family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 128, "vocab_size": 1000}
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


class Size:
    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.shape, self.seq_len, self.pred_len, self.batch = (TINY, 64, 16, 4) if tiny else (LLAMA3_8B, 512, 96, 24)
        self.num_tokens = 50 if tiny else 1000
        self.rows = 400 if tiny else 1400  # custom split 70/10/20: > seq_len + pred_len in every split
        self.timed = 3 if tiny else 10
        self.warmup = 1 if tiny else 3
        self.loss_steps = 5 if tiny else 50
        self.save_steps, self.save_every = (6, 3) if tiny else (60, 20)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_csv(folder: Path, rows: int) -> Path:
    """A 7-column series shaped like ETTh1 (daily and weekly cycles, noise, a trend), seeded."""
    rng = np.random.default_rng(0)
    t = np.arange(rows)
    data = {"date": pd.date_range("2016-07-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S")}
    for i, name in enumerate(COLUMNS):
        data[name] = (np.sin(2 * np.pi * t / 24 + i) + 0.5 * np.sin(2 * np.pi * t / 168 + 2 * i)
                      + 0.001 * t + 0.2 * rng.standard_normal(rows)).round(4)
    path = folder / "series.csv"
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def spec_for(size: Size, folder: Path, csv: Path, device: str, **fields) -> object:
    model = {"backbone": {"random": size.shape}, "quantization": "nf4", "d_model": 32,
             "d_ff": min(128, size.shape["hidden_size"]), "n_heads": 8, "patch_len": 16, "stride": 8,
             "num_tokens": size.num_tokens, "dropout": 0.1, "compute_dtype": fields.pop("compute_dtype", "auto")}
    train = {"epochs": fields.pop("epochs", 100), "batch_size": size.batch, "eval_batch_size": 8,
             "learning_rate": 0.001, "device": device, "micro_batch_size": "auto", "gradient_checkpointing": "auto",
             **fields.pop("train", {})}
    raw = {"name": fields.pop("name", "bench"), "storage": {"root": str(folder / "root"), "save_steps": 10**6},
           "data": {"path": str(csv), "kind": "custom", "features": "M", "seq_len": size.seq_len,
                    "label_len": min(48, size.seq_len), "pred_len": size.pred_len,
                    "percent": fields.pop("percent", 100)},
           "model": model, "train": train, "run": {"backbone_cache": False, **fields.pop("run", {})}}
    return parse_spec(raw, folder)


def build_trainer(spec, background: bool = True) -> tuple[Trainer, float]:
    start = time.perf_counter()
    trainer = Trainer(spec, background_saves=background)
    trainer.build()
    trainer.resume()
    sync(trainer.parts.device)
    return trainer, time.perf_counter() - start


def batches(trainer: Trainer, n: int) -> list:
    out, epoch = [], 0
    while len(out) < n:
        for _, (x, y, _) in train_batches(trainer.parts.splits.train, trainer.spec.train.batch_size, 0, epoch):
            out.append((x, y))
            if len(out) == n:
                break
        epoch += 1
    return out


def put_plan(trainer: Trainer, micro: int, checkpointing: bool) -> None:
    trainer.plan = memory.MemoryPlan(micro, checkpointing, trainer.parts.compute_dtype, per_process_batch(trainer.spec, trainer.world),
                                     trainer.parts.card.name, trainer.parts.card.total_bytes, how="bench")
    set_gradient_checkpointing(trainer.parts.backbone.model, checkpointing)


def time_steps(trainer: Trainer, size: Size) -> dict:
    """Median step time of ``size.timed`` optimizer steps after warm-up, with the plan in force."""
    device = trainer.parts.device
    data = batches(trainer, size.warmup + size.timed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, (x, y) in enumerate(data):
        sync(device)
        t = time.perf_counter()
        trainer.optimizer_step(x, y)
        sync(device)
        if i >= size.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return {"micro_batch_size": trainer.plan.micro_batch_size, "gradient_checkpointing": trainer.plan.gradient_checkpointing,
            "compute_dtype": trainer.parts.compute_dtype, "step_s": step, "samples_per_s": size.batch / step,
            "peak_gib": memory.peak_bytes(device) / GiB if device.startswith("cuda") else None}


def set_cap(device: str, cap_gib: float | None) -> None:
    if not device.startswith("cuda"):
        return
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total) if cap_gib else 1.0)


def plan_under_cap(trainer: Trainer, size: Size, cap_gib: float | None) -> dict:
    """The plan ``auto`` makes under the cap (the trainer's probe), then its measured steps."""
    set_cap(trainer.parts.device, cap_gib)
    card = memory.card_of(trainer.parts.device)
    checkpointing = memory.checkpointing("auto", card)
    start = time.perf_counter()
    try:
        plan = memory.decide(trainer.spec, card, trainer.parts.compute_dtype, checkpointing, per_process_batch(trainer.spec, trainer.world),
                             None, functools.partial(probe_peak, trainer.spec, trainer.parts, trainer.state) if card.gpu else None)
    except memory.OutOfPlans as exc:
        set_cap(trainer.parts.device, None)
        return {"cap_gib": cap_gib, "error": str(exc)}
    planning_s = time.perf_counter() - start
    trainer.plan = plan
    set_gradient_checkpointing(trainer.parts.backbone.model, plan.gradient_checkpointing)
    try:
        measured = time_steps(trainer, size)
    except torch.OutOfMemoryError as exc:
        measured = {"error": f"out of memory while stepping: {str(exc)[:200]}"}
    set_cap(trainer.parts.device, None)
    return {"cap_gib": cap_gib, "card_budget_gib": (card.total_bytes or 0) / GiB, "plan": plan.to_json(),
            "planning_s": planning_s, **measured}


def full_batch_configs(trainer: Trainer, size: Size) -> list[dict]:
    out = []
    for checkpointing in (False, True):
        put_plan(trainer, size.batch, checkpointing)
        try:
            out.append(time_steps(trainer, size))
        except torch.OutOfMemoryError:
            out.append({"compute_dtype": trainer.parts.compute_dtype, "gradient_checkpointing": checkpointing,
                        "error": "out of memory"})
        if trainer.parts.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def loss_curve(trainer: Trainer, size: Size) -> dict:
    """``size.loss_steps`` optimizer steps from the freshly built weights, on fixed batches."""
    put_plan(trainer, size.batch, True)
    losses = []
    skipped = 0
    for x, y in batches(trainer, size.loss_steps):
        loss, was_skipped = trainer.optimizer_step(x, y)
        losses.append(float(loss))
        skipped += was_skipped
    return {"compute_dtype": trainer.parts.compute_dtype, "losses": losses, "skipped_steps": skipped,
            "final_scale": trainer.state.scaler.get_scale() if trainer.state.scaler.is_enabled() else None}


def saves(trainer: Trainer, size: Size, modes=("none", "sync", "background", "background-1", "none")) -> dict:
    """Training time with a checkpoint every ``save_every`` steps through Trainer.save, per mode.

    Reported apart: the time to the last step (``train_s``: what saves cost training) and the
    wait for the last write after it (``final_wait_s``: once per run, not per save), and each
    step's time, so steps with a write in flight can be told from steps without one."""
    trainer.state.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.state.optimizer, lambda s: 1.0)  # any number of steps
    put_plan(trainer, size.batch, trainer.plan.gradient_checkpointing if trainer.plan else False)
    data = batches(trainer, size.save_steps + 1)
    out = {}
    for mode in modes:  # "none" twice: the first run warms up; background-1: one file written at a time
        trainer.checkpoints.saver = CheckpointSaver(trainer.job, trainer.identity.hash, 2, background=mode.startswith("background"),
                                        background_workers=1 if mode == "background-1" else 4)
        sync(trainer.parts.device)
        start = time.perf_counter()
        steps, in_flight = [], []
        for i, (x, y) in enumerate(data[1:], start=1):
            t = time.perf_counter()
            flying = trainer.checkpoints.saver._thread is not None and trainer.checkpoints.saver._thread.is_alive()
            trainer.optimizer_step(x, y)
            trainer.state.progress.global_step += 1
            if mode != "none" and i % size.save_every == 0:
                trainer.save("step")
            sync(trainer.parts.device)
            (in_flight if flying else steps).append(time.perf_counter() - t)
        trained = time.perf_counter() - start
        trainer.checkpoints.saver.wait()
        sync(trainer.parts.device)
        total = time.perf_counter() - start
        out[mode] = {"total_s": total, "train_s": trained, "final_wait_s": total - trained,
                     "step_median_s": statistics.median(steps),
                     "in_flight_step_median_s": statistics.median(in_flight) if in_flight else None,
                     "in_flight_steps": len(in_flight)}
    none = out["none"]
    ratios = {}
    for mode in out:
        if mode != "none":
            key = mode.replace("-", "_")
            ratios[f"{key}_ratio"] = out[mode]["total_s"] / none["total_s"]
            ratios[f"{key}_train_ratio"] = out[mode]["train_s"] / none["train_s"]
            if out[mode]["in_flight_step_median_s"]:
                ratios[f"{key}_in_flight_step_over_plain"] = out[mode]["in_flight_step_median_s"] / none["step_median_s"]
    return {"steps": size.save_steps, "every": size.save_every, "none_s": none["total_s"], "modes": out, **ratios}


def stall_and_resume(trainer: Trainer) -> dict:
    """The save's stall on the training thread (a copy to reused host buffers), the commit of
    that checkpoint, and a resume of it (load + verify + restore)."""
    p, device = trainer.state.progress, trainer.parts.device
    stalls = []
    for _ in range(3):  # the first capture allocates the (pinned) host buffers
        sync(device)
        t = time.perf_counter()
        snap = checkpoint_state.capture(trainer.state.model, trainer.state.optimizer, trainer.state.scheduler, p, trainer.checkpoints.host_buffers)
        stalls.append(time.perf_counter() - t)
    trainer.checkpoints.saver.wait()
    t = time.perf_counter()
    p.global_step += 1
    trainer.save("step", wait=True)
    write = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_newest(trainer.job, spec_hash=trainer.identity.hash)
    checkpoint_state.restore(checkpoint_state.read_files(loaded.files), trainer.state.model, trainer.state.optimizer, trainer.state.scheduler)
    sync(device)
    del snap
    return {"checkpoint_bytes": loaded.manifest.bytes, "save_stall_s": statistics.median(stalls[1:]),
            "first_save_stall_s": stalls[0], "save_write_s": write, "resume_s": time.perf_counter() - t}


def _device_time(event) -> float:
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))


def profile_saves(trainer: Trainer, size: Size) -> dict:
    """torch.profiler over a window of steps with a background save in flight, and over one
    without: what the training thread waits on while a save runs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.parts.device.startswith("cuda") else [])
    trainer.checkpoints.saver = CheckpointSaver(trainer.job, trainer.identity.hash, 2, background=True)
    window = max(3, size.save_every // 2)
    data = batches(trainer, window)
    watch = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaHostAlloc", "cudaMallocHost",
             "cudaMemcpyAsync", "Memcpy DtoH", "Memcpy HtoD", "aten::copy_", "aten::item",
             "aten::_local_scalar_dense")
    out = {}
    for label in ("without_save", "with_save_in_flight"):
        trainer.checkpoints.saver.wait()
        sync(trainer.parts.device)
        step_times = []
        with profile(activities=activities) as prof:
            for i, (x, y) in enumerate(data):
                if label == "with_save_in_flight" and i == 0:
                    trainer.state.progress.global_step += 1
                    trainer.save("step")  # the capture, then the write on the saver's thread
                t = time.perf_counter()
                trainer.optimizer_step(x, y)
                sync(trainer.parts.device)
                step_times.append(time.perf_counter() - t)
        events = prof.key_averages()
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        out[label] = {
            "step_s": step_times,
            "watched": {e.key: {"count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                                "device_ms": _device_time(e) / 1e3} for e in events if e.key in watch},
            "top_self_cpu": [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                             for e in top]}
    trainer.checkpoints.saver.wait()
    return out


def submit(args: list[str], folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "timellm_job.orchestrator.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=with_faults({**os.environ, **env,
                                                                   "TIMELLM_JOB_WORKDIR": str(folder / "work")}))


def oom_through_the_cli(size: Size, folder: Path, csv: Path, device: str) -> dict:
    """A plan forced too large under a T4's memory: diagnosis and exit 1 at once; then ``auto``."""
    spec = spec_for(size, folder, csv, device, name="oom", epochs=1, compute_dtype="fp16", percent=30,
                    train={"micro_batch_size": size.batch, "gradient_checkpointing": False},
                    run={"backbone_cache": True, "max_restarts": 5})
    path = folder / "oom.yaml"
    from timellm_job.jobs.spec_files import spec_to_yaml

    path.write_text(spec_to_yaml(spec))
    env = {"TIMELLM_JOB_BACKBONE_CACHE": str(folder / "backbones")}
    env.update({"TIMELLM_TEST_CUDA_MEMORY_GIB": "15"} if device.startswith("cuda") else
               {"TIMELLM_TEST_OOM_ABOVE_MICRO": str(size.batch // 2)})
    start = time.perf_counter()
    forced = submit(["submit", str(path)], folder, env)
    forced_s = time.perf_counter() - start
    first = json.loads(submit(["status", str(path), "--json"], folder, env).stdout)
    start = time.perf_counter()
    auto = submit(["submit", str(path), "--set", "train.micro_batch_size=auto",
                   "--set", "train.gradient_checkpointing=auto"], folder, env)
    auto_s = time.perf_counter() - start
    after = json.loads(submit(["status", str(path), "--json"], folder, env).stdout)
    return {"forced": {"exit": forced.returncode, "seconds": forced_s, "phase": first["phase"],
                       "reason": first["reason"], "attempts": len(first["attempts"]),
                       "stderr_tail": forced.stderr[-1500:]},
            "auto": {"exit": auto.returncode, "seconds": auto_s, "phase": after["phase"],
                     "attempts": [{k: a.get(k) for k in ("number", "reason", "memory_plan", "start_step", "end_step")}
                                  for a in after["attempts"]],
                     "stderr_tail": auto.stderr[-1500:]}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (for the test suite)")
    ap.add_argument("--parts", default="plan,loss,oom,saves")
    ap.add_argument("--save-modes", help="the saves part's modes, comma-separated (default: all; the profile "
                                         "runs only with the default)")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    size = Size(a.tiny)
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "shape": size.shape, "seq_len": size.seq_len, "pred_len": size.pred_len, "batch": size.batch,
            "features": "M (7 columns, one series per sample)"}
    try:
        import bitsandbytes
        import transformers

        info.update(transformers=transformers.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        csv = make_csv(folder, size.rows)
        # a T4 computes in fp16 (no bf16); an L4, A100, H100 in bf16
        caps = {"fp16": [15.0], "bf16": [22.0, None]} if device == "cuda" else {"fp16": [None], "bf16": [None]}
        info["plans"], info["full_batch"], info["loss"] = [], [], {}
        for dtype in ("fp16", "bf16"):
            if not parts & {"plan", "loss", "saves"} or (dtype == "fp16" and not parts & {"plan", "loss"}):
                continue
            trainer, built = build_trainer(spec_for(size, folder, csv, device, compute_dtype=dtype, name=f"b-{dtype}"))
            info[f"build_{dtype}_s"] = built
            info["trainable_params"] = sum(p.numel() for p in trainer.state.model.trainable_state().values())
            if device == "cuda":
                info["backbone_gib"] = torch.cuda.memory_allocated() / GiB
            if "loss" in parts:
                info["loss"][dtype] = loss_curve(trainer, size)
            if "plan" in parts:
                for cap in caps[dtype]:
                    info["plans"].append(plan_under_cap(trainer, size, cap))
                    print(json.dumps(info["plans"][-1]), flush=True)
                info["full_batch"] += full_batch_configs(trainer, size)
            if dtype == "bf16" and "saves" in parts:
                info.update(stall_and_resume(trainer))
                if a.save_modes:
                    info["saves"] = saves(trainer, size, tuple(a.save_modes.split(",")))
                else:
                    info["saves"] = saves(trainer, size)
                    info["saves_profile"] = profile_saves(trainer, size)
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
        if "plan" in parts and device == "cuda":
            t4 = next((p for p in info["plans"] if p.get("cap_gib") == 15.0 and "step_s" in p), None)
            bf16 = next((c for c in info["full_batch"] if c.get("compute_dtype") == "bf16"
                         and not c.get("gradient_checkpointing") and "step_s" in c), None)
            if t4 and bf16:
                info["t4_target"] = {"peak_gib": t4["peak_gib"], "peak_target_gib": 14.5,
                                     "step_over_uncapped_bf16": t4["step_s"] / bf16["step_s"], "step_target": 1.6}
        if "oom" in parts:
            info["oom"] = oom_through_the_cli(size, folder, csv, device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    line = json.dumps(info)
    print(line, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(line)
    return info


if __name__ == "__main__":
    main()
