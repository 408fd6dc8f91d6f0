"""Cold restarts: time from ``submit`` to the first training step when a job is resubmitted on a
fresh machine (empty HF cache, empty local backbone cache), without and with the job's backbone
cache, through local storage and the GCS emulator.

    python -m benchmarks.cold_start_bench [--runs 3]
    python -m benchmarks.cold_start_bench --shape llama-3-8b --device cuda --only hub-local --runs 1

Nothing can be downloaded here, so a random Llama-shaped model written to a local folder stands
in for the hub, reached two ways:

- ``hub on 127.0.0.1``: the folder served by tests/hub_server.py (the Hugging Face Hub's file
  protocol) and loaded by repo id with ``HF_ENDPOINT`` pointing at it, into an empty HF cache:
  the real download path at loopback speed, the cheapest a download can be;
- ``local folder``: ``model.backbone.pretrained`` is the folder's path: nothing to download.

Every start is a resubmit of the same job after the previous one was preempted (SIGINT), so each
resumes from a checkpoint; "without" has ``run.backbone_cache: false`` (download, or read, and
quantize to NF4 every time), "with" has the job's cache (written by the untimed first start),
read from the job's storage on the fresh machine. The job's step is kept small
(``features: S``, batch 1) so start-up, not the step's compute, is measured. The breakdown columns come
from the trainer's start-up marks in its heartbeat.
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
import uuid
from pathlib import Path

from benchmarks.common import TINY_SPEC, machine

REPO = Path(__file__).resolve().parents[1]

REPO_ID = "stand-in/llama"


SHAPES = {  # Llama-shaped stand-ins for the hub's model ("tiny": to try the benchmark itself)
    "tiny": {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 1,
             "intermediate_size": 704, "vocab_size": 32000},
    "small": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,
              "intermediate_size": 5632, "vocab_size": 32000},
    "llama-3-8b": {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 128256},
}


def make_hub_folder(folder: Path, shape: str, device: str) -> int:
    """The stand-in written as hub checkpoints are: bf16 safetensors shards, config, tokenizer."""
    import torch

    from timellm_job.jobs.spec import RandomBackbone
    from timellm_job.trainer.backbone import build_random_weights, random_tokenizer

    r = RandomBackbone.model_validate({"family": "llama", **SHAPES[shape]})
    model = build_random_weights(r, r.num_layers, device, torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    random_tokenizer(r.vocab_size, r.family).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.iterdir())


def start(root: str, options: dict, name: str, backbone: str, cache: bool, env: dict, device: str) -> dict:
    """One submit, preempted (SIGINT) after its trainer's first step: seconds from the start of
    ``submit`` to each of the trainer's start-up marks (``first_step``: the first optimizer step
    done; same machine, same clock)."""
    sets = [f"name={name}", f"model.backbone={{pretrained: {backbone}}}", "model.quantization=nf4",
            "model.d_ff=32", f"run.backbone_cache={str(cache).lower()}", f"storage.options={json.dumps(options)}",
            "data.percent=5", "data.features=S", "train.batch_size=1", f"train.device={device}"]
    argv = [sys.executable, "-m", "timellm_job.orchestrator.cli", "submit", str(TINY_SPEC), "--root", root]
    for s in sets:
        argv += ["--set", s]
    work = Path(env["TIMELLM_JOB_WORKDIR"])
    log = work.parent / "submit.log"  # a file, not a pipe nobody reads while it runs
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            for beat in work.glob("*/heartbeat-*.json"):
                try:
                    doc = json.loads(beat.read_text())
                except (OSError, ValueError):
                    continue
                if "first_step" in doc.get("startup", {}):
                    marks = {k: v - t0 for k, v in doc["startup"].items()}
                    return {**marks, "source": doc.get("backbone_source", "")}
            if proc.poll() is not None:
                raise RuntimeError(f"submit exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # preempted: the next start resumes from its checkpoint
        proc.wait()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", choices=["hub-local", "folder-local", "all"], default="all",
                    help="one stand-in with local storage (hub-local: the GPU run)")
    ap.add_argument("--quick", action="store_true",
                    help="no untimed first start without the cache (then a timed start has no checkpoint to read, "
                         "which favours 'without')")
    a = ap.parse_args()
    from tests import servers
    from tests.hub_server import HubServer

    tmp = Path(tempfile.mkdtemp(prefix="cold-", dir="/var/tmp"))
    gcs = servers.start_gcs() if a.only == "all" else None
    if gcs:
        os.environ.update(servers.gcs_env(gcs))
    hub = None
    try:
        hub_bytes = make_hub_folder(tmp / "hub", a.shape, a.device)
        hub = HubServer({REPO_ID: tmp / "hub"}).start()
        hubs = [("hub on 127.0.0.1", REPO_ID), ("local folder", str(tmp / "hub"))]
        stores = [("local disk", str(tmp / "root"), {})]
        if gcs:
            stores.append(("GCS emulator", f"gs://{servers.GCS_BUCKET}/cold", servers.gcs_options(gcs)))
        rows = []
        for hub_label, backbone in {"hub-local": hubs[:1], "folder-local": hubs[1:]}.get(a.only, hubs):
            for label, root, options in stores:
                for cache in (False, True):
                    name = f"cold-{uuid.uuid4().hex[:6]}"
                    samples = []
                    first = 0 if a.quick and not cache else 1  # untimed: it builds (and writes the cache)
                    for i in range(a.runs + first):
                        fresh = tmp / f"machine-{uuid.uuid4().hex[:6]}"
                        env = {**os.environ, "TIMELLM_JOB_WORKDIR": str(fresh / "work"),
                               "TIMELLM_JOB_BACKBONE_CACHE": str(fresh / "backbones"),
                               "HF_HOME": str(fresh / "hf"), "HF_ENDPOINT": hub.endpoint,
                               "HF_HUB_DISABLE_TELEMETRY": "1"}
                        marks = start(root, options, name, backbone, cache, env, a.device)
                        shutil.rmtree(fresh, ignore_errors=True)
                        print(f"{hub_label} / {label} / cache={cache} #{i}: "
                              f"{ {k: (round(v, 2) if isinstance(v, float) else v) for k, v in marks.items()} }",
                              flush=True)
                        if i >= first:
                            samples.append(marks)
                    rows.append((hub_label, label, cache, {k: statistics.median(s[k] for s in samples)
                                                           for k in ("imported", "backbone", "resumed", "first_step")},
                                 samples[-1]["source"]))
        shape = SHAPES[a.shape]
        print(f"\nmachine: {machine()}{'; ' + gpu_name() if a.device == 'cuda' else ''}; stand-in hub model "
              f"{a.shape!r}: {hub_bytes / 1e9:.2f} GB bf16 ({shape['num_layers']} layers, hidden "
              f"{shape['hidden_size']}, vocab {shape['vocab_size']}), quantized to NF4 on the {a.device}; "
              f"median of {a.runs} resubmits on a fresh machine each\n")
        print("| hub stand-in | job storage | backbone cache | trainer imported (s) | backbone ready (s) "
              "| resumed (s) | first step done (s) | ratio | target |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        without = {}
        for hub_label, label, cache, m, source in rows:
            if not cache:
                without[(hub_label, label)] = m["first_step"]
            ratio = f"{m['first_step'] / without[(hub_label, label)]:.2f}" if cache else ""
            print(f"| {hub_label} | {label} | {'on (' + source.split(':')[0] + ')' if cache else 'off'} "
                  f"| {m['imported']:.1f} | {m['backbone']:.1f} | {m['resumed']:.1f} | {m['first_step']:.1f} "
                  f"| {ratio} | {'<= 0.5' if cache else ''} |")
    finally:
        if hub is not None:
            hub.stop()
        if gcs:
            gcs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
