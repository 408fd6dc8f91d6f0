"""The NF4 Llama-3-8B-shaped Time-LLM training step on one GPU (and, with --tiny, on a CPU).

    python benchmarks/gpu_bench.py            # on a GPU: Llama-3-8B's shape, random weights
    python benchmarks/gpu_bench.py --tiny     # on a CPU, a tiny shape (the test suite runs this)

The backbone (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary
128,256) gets random weights (nothing can be downloaded) and is quantized to NF4 by the
trainer's own loader (trainer.backbone.load_backbone); Time-LLM runs at seq_len 512, pred_len
96, batch 24, d_model 32, d_ff 128. Printed: build+quantize time, step time (median of >= 20
steps after warm-up), samples/s, peak GPU memory, the checkpoint save stall and the resume time
of the real trainable state, and the batch size and step time that fit in 15 GB (a Colab T4)
with gradient checkpointing. A JSON summary goes to stdout's last line and to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jobs.spec import DataSpec, ModelSpec  # noqa: E402
from storage import commit_checkpoint, job_store, load_newest  # noqa: E402
from trainer import state as ckpt_state  # noqa: E402
from trainer.backbone import load_backbone  # noqa: E402
from trainer.model import TimeLLM  # noqa: E402

LLAMA3_8B = {"family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256}
TINY = {"family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 128, "vocab_size": 1000}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape: dict, quant: str, device: str, seq_len: int, pred_len: int, num_tokens: int):
    ms = ModelSpec.model_validate({"backbone": {"random": shape}, "quantization": quant, "d_model": 32,
                                   "d_ff": min(128, shape["hidden_size"]), "n_heads": 8, "patch_len": 16,
                                   "stride": 8, "num_tokens": num_tokens, "dropout": 0.1})
    ds = DataSpec.model_validate({"path": "synthetic", "seq_len": seq_len, "pred_len": pred_len,
                                  "label_len": min(48, seq_len)})
    start = time.perf_counter()
    backbone = load_backbone(ms, device)
    sync(device)
    built = time.perf_counter() - start
    torch.manual_seed(0)
    model = TimeLLM(ms, ds, backbone).to(device)
    return model, built


def steps(model, device: str, batch: int, seq_len: int, pred_len: int, n: int, warmup: int,
          on_step=None) -> list[float]:
    opt = torch.optim.Adam(list(model.trainable_state().values()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + n):
        x = torch.randn(batch, seq_len, 1, generator=g).to(device)
        y = torch.randn(batch, pred_len, 1, generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None and i >= warmup:
            on_step(i - warmup + 1, opt)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    model._bench_opt = opt
    return times


def save_overhead(model, device: str, batch: int, seq_len: int, pred_len: int, n: int, every: int) -> dict:
    """Training time with a save every ``every`` steps (synchronous / background) over none."""
    from trainer.saver import CheckpointSaver

    out = {}
    for mode in ("none", "sync", "background"):
        root = tempfile.mkdtemp(prefix="gpu-saves-")
        try:
            saver = CheckpointSaver(job_store(root, "job"), "bench", 2, background=mode == "background")
            buffers = ckpt_state.HostBuffers()
            sched_holder = {}

            def on_step(i, opt, saver=saver, buffers=buffers, sched_holder=sched_holder, mode=mode):
                if mode == "none" or i % every:
                    return
                sched = sched_holder.setdefault("s", torch.optim.lr_scheduler.OneCycleLR(
                    opt, max_lr=1e-3, total_steps=10_000, pct_start=0.2))
                saver.wait()
                snap = ckpt_state.capture(model, opt, sched, ckpt_state.Progress(global_step=i), buffers)
                saver.submit(snap, i, "step", [i], {})

            t = time.perf_counter()
            steps(model, device, batch, seq_len, pred_len, n, warmup=1, on_step=on_step)
            saver.wait()
            out[mode] = time.perf_counter() - t
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {"steps": n, "every": every, "none_s": out["none"], "sync_ratio": out["sync"] / out["none"],
            "background_ratio": out["background"] / out["none"]}


def save_and_resume(model, device: str) -> dict:
    opt = model._bench_opt
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=1000, pct_start=0.2)
    progress = ckpt_state.Progress(global_step=1)
    buffers = ckpt_state.HostBuffers()  # as the trainer does: reused from one save to the next
    stalls = []
    for _ in range(3):  # the first capture also allocates (pinned) host memory
        sync(device)
        t = time.perf_counter()
        snap = ckpt_state.capture(model, opt, sched, progress, buffers)
        stalls.append(time.perf_counter() - t)
    first_stall, stall = stalls[0], statistics.median(stalls[1:])
    root = tempfile.mkdtemp(prefix="gpu-bench-")
    try:
        job = job_store(root, "job")
        t = time.perf_counter()
        manifest = commit_checkpoint(job, 1, "step", snap.to_files(), "bench")
        write = time.perf_counter() - t
        size = manifest.bytes
        t = time.perf_counter()
        loaded = load_newest(job)
        ckpt_state.restore(ckpt_state.read_files(loaded.files), model, opt, sched)
        sync(device)
        resume = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"checkpoint_bytes": size, "save_stall_s": stall, "first_save_stall_s": first_stall,
            "save_write_s": write, "resume_s": resume}


def fit_15gb(model, device: str, seq_len: int, pred_len: int, n: int) -> dict:
    """Largest batch (of 24, 16, 8, 4, 2) whose step fits in 15 GB, with gradient checkpointing."""
    model._bench_opt = None  # drop the previous optimizer's state and gradients first
    for p in model.trainable_state().values():
        p.grad = None
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 15 * 2**30 / total))
    llm = model.backbone.model
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.train()  # checkpointing is active in training mode only (the frozen weights do not change)
    out = {"batch": None}
    for batch in (24, 16, 8, 4, 2):
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            times = steps(model, device, batch, seq_len, pred_len, n, warmup=2)
            out = {"batch": batch, "step_s": statistics.median(times), "samples_per_s": batch / statistics.median(times),
                   "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
            break
        except torch.cuda.OutOfMemoryError:
            continue
    llm.gradient_checkpointing_disable()
    llm.eval()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (for the test suite)")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    shape, seq_len, pred_len, batch = (TINY, 64, 16, 4) if a.tiny else (LLAMA3_8B, 512, 96, 24)
    n = 3 if a.tiny else a.steps
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "shape": shape, "seq_len": seq_len, "pred_len": pred_len, "batch": batch}
    try:
        import bitsandbytes
        import transformers

        info.update(transformers=transformers.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    model, built = build(shape, "nf4", device, seq_len, pred_len, 1000 if not a.tiny else 50)
    info["build_and_quantize_s"] = built
    info["trainable_params"] = sum(p.numel() for p in model.trainable_state().values())
    if device == "cuda":
        info["backbone_gb"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    times = steps(model, device, batch, seq_len, pred_len, n, warmup=1 if a.tiny else 3)
    info["step_s_median"] = statistics.median(times)
    info["samples_per_s"] = batch / info["step_s_median"]
    info["steps_timed"] = len(times)
    if device == "cuda":
        info["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    info.update(save_and_resume(model, device))
    info["saves"] = save_overhead(model, device, batch, seq_len, pred_len, n=6 if a.tiny else 60,
                                  every=3 if a.tiny else 20)
    if device == "cuda":
        info["fit_15gb_grad_ckpt"] = fit_15gb(model, device, seq_len, pred_len, max(5, n // 2))
    line = json.dumps(info)
    print(line, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(line)
    return info


if __name__ == "__main__":
    main()
