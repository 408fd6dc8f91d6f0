"""Checkpoint save / verify / load through storage/, against a plain write / read of the same bytes.

    python -m benchmarks.storage_bench [--runs 5] [--gcs-mb 64]

Local disk: the Llama-3-sized trainable state plus Adam (~1.7 GB, the files the trainer writes).
GCS: a smaller checkpoint through the real gcsfs against gcp-storage-emulator on 127.0.0.1.
Reads are measured cold (page cache dropped, when root) and warm.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import drop_caches, llama3_trainable_state, machine, median_time
from timellm_job.storage import commit_checkpoint, job_store, load  # noqa: E402


def checkpoint_files():
    """The files the trainer writes for the Llama-3-sized state after one Adam step."""
    import torch

    from timellm_job.trainer.checkpoint_state import Progress, capture

    params = {k: torch.nn.Parameter(v) for k, v in llama3_trainable_state().items()}

    class Model:
        def trainable_state(self):
            return params

    opt = torch.optim.Adam(list(params.values()), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    files = capture(Model(), opt, sched, Progress(global_step=1)).to_files()
    files = {k: b"".join(v) if isinstance(v, list) else v for k, v in files.items()}  # the same bytes for both
    return files, sum(p.numel() for p in params.values())


def plain_write(folder: Path, files: dict[str, bytes], fsync: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        with open(folder / name, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def plain_read(folder: Path, names) -> int:
    return sum(len((folder / n).read_bytes()) for n in names)


def local(runs: int) -> list[tuple]:
    files, n_params = checkpoint_files()
    total = sum(len(v) for v in files.values())
    mb = total / 1e6
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    rows = []
    try:
        job = job_store(str(base), "job")
        step = [0]

        def commit():
            step[0] += 1
            commit_checkpoint(job, step[0], "step", files, "bench")

        def clean():
            shutil.rmtree(base / "job" / "checkpoints", ignore_errors=True)
            shutil.rmtree(base / "plain", ignore_errors=True)

        t_commit = median_time(commit, runs, before=clean)
        t_plain_fsync = median_time(lambda: plain_write(base / "plain", files, True), runs, before=clean)
        t_plain = median_time(lambda: plain_write(base / "plain", files, False), runs, before=clean)
        commit()
        plain_write(base / "plain", files, True)
        from timellm_job.storage import list_checkpoints

        manifest = list_checkpoints(job).committed[0]
        cold = drop_caches()
        for label, before in (("cold", drop_caches if cold else None), ("warm", None)):
            t_load = median_time(lambda: load(job, manifest), runs, before=before)
            t_read = median_time(lambda: plain_read(base / "plain", files), runs, before=before)
            rows.append((f"local disk, verify-on-read ({label} cache)", mb, mb / t_load, mb / t_read, t_read / t_load,
                         ">= 0.8x plain read"))
        rows.insert(0, ("local disk, commit (hash + fsync + rename)", mb, mb / t_commit, mb / t_plain_fsync,
                        t_commit / t_plain_fsync, "<= 1.1x plain write+fsync (ratio = time)"))
        rows.insert(1, ("local disk, commit vs write without fsync", mb, mb / t_commit, mb / t_plain,
                        t_commit / t_plain, "(for reference; ratio = time)"))
        print(f"state: {n_params / 1e6:.1f}M trainable parameters + Adam = {mb:.0f} MB; cold reads: {cold}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def gcs(runs: int, size_mb: int) -> list[tuple]:
    from tests import servers

    server = servers.start_gcs()
    os.environ.update(servers.gcs_env(server))
    try:
        files = {"model.safetensors": os.urandom(size_mb * 2**20 // 3),
                 "optimizer.safetensors": os.urandom(2 * size_mb * 2**20 // 3)}
        mb = sum(len(v) for v in files.values()) / 1e6
        opts = servers.gcs_options(server)
        job = job_store(f"gs://{servers.GCS_BUCKET}/bench-{uuid.uuid4().hex[:6]}", "job", opts)
        step = [0]

        def commit():
            step[0] += 1
            return commit_checkpoint(job, step[0], "step", files, "bench")

        def plain_put():  # the same streaming upload, without hashing or a manifest
            for name, data in files.items():
                with job.fs.open(f"{job.root}/plain/{name}", "wb", block_size=8 * 2**20) as f:
                    f.write(data)

        t_commit = median_time(commit, runs)
        t_put = median_time(plain_put, runs)
        manifest = commit()
        t_load = median_time(lambda: load(job, manifest), runs)
        t_get = median_time(lambda: [job.fs.cat_file(f"{job.root}/plain/{n}") for n in files], runs)
        return [("GCS emulator, commit", mb, mb / t_commit, mb / t_put, t_commit / t_put, "<= 1.1x (ratio = time)"),
                ("GCS emulator, verify-on-read", mb, mb / t_load, mb / t_get, t_get / t_load, ">= 0.8x plain read")]
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gcs-mb", type=int, default=64)
    a = ap.parse_args()
    started = time.time()
    rows = local(a.runs) + gcs(a.runs, a.gcs_mb)
    print(f"\nmachine: {machine()}; median of {a.runs} runs; {time.time() - started:.0f} s in all\n")
    print("| operation | MB | timellm-job MB/s | plain MB/s | ratio | target |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, mb, ours, plain, ratio, target in rows:
        print(f"| {name} | {mb:.0f} | {ours:.0f} | {plain:.0f} | {ratio:.2f} | {target} |")


if __name__ == "__main__":
    main()
