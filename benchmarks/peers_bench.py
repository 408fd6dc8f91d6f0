"""timellm-job next to what a user would reach for instead (Hugging Face accelerate), on the same
model state and data in the same run; and the recovery breakdown after a SIGKILL.

    python -m benchmarks.peers_bench stall    [--runs 5] [--steps 24] [--every 6]
    python -m benchmarks.peers_bench resume   [--runs 5]
    python -m benchmarks.peers_bench recovery [--runs 5]

stall: training wall time with saves every N steps / without, for timellm-job's background and
synchronous saves and ``Accelerator.save_state``; also the bytes each writes per checkpoint.
resume: time from process start to the end of the first training step after resuming at the
first / the last batch of an epoch (ETTh1, 100% of training windows): timellm-job's trainer
(``python -m timellm_job.trainer run``) against ``Accelerator.load_state`` + ``skip_first_batches`` over a
map-style and an iterable dataset of the same windows in the same order.
recovery: submit a job, SIGKILL its trainer, and split the time to the restarted trainer's first
step into detection, backoff, process start and imports, data and backbone, model build,
checkpoint read and verify, and the first step; beside the same parts of the fresh start.
The model is the tiny job with the Llama-3 vocabulary (mapping layer 128,256 -> 1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import TINY_SPEC, machine, with_faults
from benchmarks.trainer_bench import LLAMA3_VOCAB, step, trainer_for

REPO = Path(__file__).resolve().parents[1]

FULL_EPOCH = ["--set", "data.percent=100"]


def _sets(extra: list[str]) -> tuple[str, ...]:
    sets = LLAMA3_VOCAB + extra
    return tuple(sets[i + 1] for i in range(0, len(sets), 2))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------- stall
def stall(runs: int, steps: int, every: int) -> None:
    from accelerate import Accelerator

    from timellm_job.trainer.data import train_batches

    modes = ("none", "timellm-job sync", "timellm-job background", "accelerate save_state")
    times: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, int] = {}
    n_params = 0
    for _ in range(runs):
        for mode in modes:
            root = Path(tempfile.mkdtemp(prefix="stall-bench-", dir="/var/tmp"))
            try:
                t = trainer_for(str(root), background=(mode == "timellm-job background"), sets=LLAMA3_VOCAB)
                n_params = sum(p.numel() for p in t.model.trainable_state().values())
                acc = None
                if mode.startswith("accelerate"):
                    acc = Accelerator(cpu=True)
                    acc.prepare(t.model, t.optimizer, t.scheduler)  # registered for save_state
                batches = train_batches(t.splits.train, t.spec.train.batch_size, 1, 0)
                step(t, batches)  # warm-up
                start = time.perf_counter()
                for i in range(1, steps + 1):
                    step(t, batches)
                    if mode != "none" and i % every == 0:
                        if acc is not None:
                            acc.save_state(str(root / "accelerate" / f"step-{i}"), safe_serialization=True)
                        else:
                            t.save("step")
                t.saver.wait()
                times[mode].append(time.perf_counter() - start)
                if mode == "accelerate save_state":
                    sizes[mode] = folder_bytes(next((root / "accelerate").iterdir()))
                elif mode != "none":
                    ckpts = root / t.spec.name / "checkpoints"
                    sizes[mode] = folder_bytes(next(ckpts.iterdir()))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["none"])
    print(f"\nmachine: {machine()}; trainable parameters {n_params / 1e6:.1f}M + Adam; {steps} steps, "
          f"a save every {every}; median of {runs} runs\n")
    print("| saves | wall time (s) | / no saves | bytes per checkpoint | / (trainable x 12) | target |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for mode in modes:
        m = statistics.median(times[mode])
        size = sizes.get(mode)
        target = {"timellm-job background": "<= 1.03", "timellm-job sync": ">= 1.20 (saves matter)"}.get(mode, "")
        size_cols = f"{size:,} | {size / (n_params * 12):.3f}" if size else " | "
        print(f"| {mode} | {m:.1f} | {m / base:.3f} | {size_cols} | {target} |")


# ---------------------------------------------------------------------------------------- resume
def _write_checkpoints(root: Path, position_batch: int) -> int:
    """A checkpoint of both systems at (epoch 1, batch ``position_batch``), from one state;
    returns its global step."""
    from accelerate import Accelerator

    from timellm_job.trainer.data import train_batches

    t = trainer_for(str(root), background=False, sets=LLAMA3_VOCAB + FULL_EPOCH)
    step(t, train_batches(t.splits.train, t.spec.train.batch_size, t.spec.train.seed, 0))  # Adam has state
    p = t.progress
    p.epoch, p.batch, p.global_step = 1, position_batch, t.steps_per_epoch + position_batch
    t.save("step", wait=True)
    acc = Accelerator(cpu=True)
    acc.prepare(t.model, t.optimizer, t.scheduler)
    acc.save_state(str(root / "accelerate"), safe_serialization=True)
    return p.global_step


def _child_accelerate(root: str, position: int, iterable: bool) -> None:
    """Child: build the same model, load_state, skip to the batch, take one step; print the time
    from process start."""
    import torch
    from accelerate import Accelerator

    from timellm_job.trainer.data import epoch_order

    t = trainer_for(root, background=False, sets=LLAMA3_VOCAB + FULL_EPOCH)
    windows, bs, seed = t.splits.train, t.spec.train.batch_size, t.spec.train.seed

    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            x, y, _ = windows.batch(torch.tensor([i]))
            return x[0], y[0]

    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in epoch_order(len(windows), seed, 1).tolist():  # the same order as timellm-job
                x, y, _ = windows.batch(torch.tensor([i]))
                yield x[0], y[0]

    if iterable:
        dl = torch.utils.data.DataLoader(Iterable(), batch_size=bs, drop_last=True)
    else:
        order = epoch_order(len(windows), seed, 1).tolist()
        dl = torch.utils.data.DataLoader(MapStyle(), batch_size=bs, sampler=order, drop_last=True)
    acc = Accelerator(cpu=True)
    model, opt, sched, dl = acc.prepare(t.model, t.optimizer, t.scheduler, dl)
    acc.load_state(str(Path(root) / "accelerate"))
    x, y = next(iter(acc.skip_first_batches(dl, position)))
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    print(json.dumps({"first_step_done": time.time()}))


def _run_timellm(root: Path, global_step: int) -> float:
    """The real trainer resuming from the checkpoint written here; it stops itself after its
    first step (a test-only switch) and leaves its start-up marks in its heartbeat."""
    spec = root / "spec.yaml"
    from timellm_job.jobs import load_spec
    from timellm_job.jobs.spec_files import spec_to_yaml

    spec.write_text(spec_to_yaml(load_spec(TINY_SPEC, root=str(root), sets=_sets(FULL_EPOCH))))
    beat = root / "heartbeat.json"
    env = with_faults({**os.environ, "TIMELLM_JOB_HEARTBEAT": str(beat),
                       "TIMELLM_JOB_TEST_FAIL_AT_STEP": str(global_step + 1)})
    launched = time.time()
    subprocess.run([sys.executable, "-m", "timellm_job.trainer", "run", str(spec), "--sync-saves"], cwd=REPO, env=env,
                   capture_output=True, timeout=600)
    doc = json.loads(beat.read_text())
    if (doc.get("resumed_from") or {}).get("step") != global_step:
        raise RuntimeError(f"the trainer did not resume from step {global_step}: {doc}")
    return doc["startup"]["first_step"] - launched


def resume(runs: int) -> None:
    from timellm_job.jobs import load_spec
    from timellm_job.trainer.data import data_options, load_splits

    spec = load_spec(TINY_SPEC, sets=_sets(FULL_EPOCH))
    n_batches = len(load_splits(spec.data, data_options(spec)).train) // spec.train.batch_size
    results: dict[tuple[str, str], list[float]] = {}
    for label in ("first", "last"):
        root = Path(tempfile.mkdtemp(prefix="resume-bench-", dir="/var/tmp"))
        try:
            position = 0 if label == "first" else n_batches - 1
            gstep = _write_checkpoints(root, position)
            for _ in range(runs):
                results.setdefault(("timellm-job", label), []).append(_run_timellm(root, gstep))
                for kind in ("map-style", "iterable"):
                    launched = time.time()
                    out = subprocess.run([sys.executable, "-m", "benchmarks.peers_bench", "_accelerate", str(root), str(position), kind],
                                         cwd=REPO, capture_output=True, text=True, timeout=900)
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr[-3000:])
                    seconds = json.loads(out.stdout.strip().splitlines()[-1])["first_step_done"] - launched
                    results.setdefault((f"accelerate load_state + skip_first_batches, {kind}", label), []).append(seconds)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nmachine: {machine()}; {n_batches} batches per epoch; process start -> end of the first "
          f"step after resuming; median of {runs} runs\n")
    print("| system | at the first batch (s) | at the last batch (s) | last / first | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for system in dict.fromkeys(s for s, _ in results):
        first, last = (statistics.median(results[(system, p)]) for p in ("first", "last"))
        print(f"| {system} | {first:.2f} | {last:.2f} | {last / first:.3f} | "
              f"{'<= 1.05' if system == 'timellm-job' else ''} |")


# ---------------------------------------------------------------------------------------- recovery
PARTS = (("data + backbone", "imported", "backbone"),
         ("model build", "backbone", "built"), ("checkpoint read + verify + restore", "built", "resumed"),
         ("first step", "resumed", "first_step"))


def _breakdown(attempt: dict, beat: dict) -> dict[str, float]:
    marks = beat["startup"]
    out = {"process start + imports": marks["imported"] - attempt["started_at"]}
    for name, a, b in PARTS:
        out[name] = marks[b] - marks[a]
    return out


def recovery(runs: int) -> None:
    from tests.cli import heartbeat, wait_until
    from tests.jobfiles import quick_spec

    rows_fresh: list[dict] = []
    rows_restart: list[dict] = []
    for _ in range(runs):
        folder = Path(tempfile.mkdtemp(prefix="recovery-bench-", dir="/var/tmp"))
        try:
            spec = quick_spec(folder, name="recovery", model={"backbone": {"random": {
                "family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                "intermediate_size": 128, "vocab_size": 128256, "seed": 0}}, "num_tokens": 1000},
                train={"epochs": 50, "patience": 1000}, storage={"save_steps": 5})
            env = with_faults({**os.environ, "TIMELLM_JOB_WORKDIR": str(folder / "work"),
                               "TIMELLM_JOB_HEARTBEAT_INTERVAL_S": "0", "TIMELLM_JOB_BACKBONE_CACHE": str(folder / "backbones"),
                               "TIMELLM_JOB_TEST_STEP_DELAY_S": "0.05"})
            proc = subprocess.Popen([sys.executable, "-m", "timellm_job.orchestrator.cli", "submit", str(spec)], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            job = folder / "root" / "recovery"

            work = folder / "work"
            wait_until(lambda w=work: heartbeat(w, 1).get("step", 0) >= 12, "step 12", poll=0.02)
            killed_at = time.time()
            os.kill(heartbeat(work, 1)["pid"], signal.SIGKILL)
            wait_until(lambda w=work: "first_step" in (heartbeat(w, 2).get("startup") or {}), "the restart's first step", poll=0.02)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            attempts = json.loads((job / "state.json").read_text())["attempts"]
            fresh, restart = _breakdown(attempts[0], heartbeat(work, 1)), _breakdown(attempts[1], heartbeat(work, 2))
            restart = {"detection (kill -> exit seen)": attempts[0]["ended_at"] - killed_at,
                       "backoff (exit seen -> next start)": attempts[1]["started_at"] - attempts[0]["ended_at"],
                       **restart}
            fresh["total"] = heartbeat(work, 1)["startup"]["first_step"] - attempts[0]["started_at"]
            restart["total"] = heartbeat(work, 2)["startup"]["first_step"] - killed_at
            rows_fresh.append(fresh)
            rows_restart.append(restart)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nmachine: {machine()}; the quick job with the Llama-3 vocabulary (mapping layer 128,256 -> 1,000), "
          f"local storage, backbone cache warm on restart; median of {runs} runs\n")
    print("| part | fresh start (s) | restart after SIGKILL (s) |")
    print("| --- | ---: | ---: |")
    for key in rows_restart[0]:
        f = statistics.median(r[key] for r in rows_fresh) if key in rows_fresh[0] else None
        s = statistics.median(r[key] for r in rows_restart)
        print(f"| {key} | {'' if f is None else f'{f:.2f}'} | {s:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_accelerate":
        _child_accelerate(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "iterable")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["stall", "resume", "recovery"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6)
    a = ap.parse_args()
    {"stall": lambda: stall(a.runs, a.steps, a.every), "resume": lambda: resume(a.runs),
     "recovery": lambda: recovery(a.runs)}[a.what]()


if __name__ == "__main__":
    main()
