"""Cold start: time from ``submit`` to the first training step on a fresh machine state (no local
backbone cache), without and with the job's backbone cache, on local storage and on GCS.

    python benchmarks/cold_start_bench.py [--runs 3]

A random Llama-shaped model of a few hundred MB written to a local folder stands in for the
hub (nothing can be downloaded here); the job quantizes it to NF4. "Without": the backbone
cache is off, so every start loads the full-precision folder and quantizes it. "With": the
job's storage holds the cached NF4 backbone (written by an earlier start) and the machine's
local cache is empty, as on a new Colab runtime.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from common import machine  # noqa: E402

TINY = REPO.parent / "shared" / "spec" / "jobs" / "tiny-cpu.yaml"
SHAPE = {"family": "llama", "hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 4,
         "intermediate_size": 2816, "vocab_size": 32000}


def make_hub_folder(folder: Path) -> int:
    from jobs.spec import RandomBackbone
    from trainer.backbone import build_random_weights, random_tokenizer

    r = RandomBackbone.model_validate(SHAPE)
    model = build_random_weights(r, r.num_layers)
    model.save_pretrained(folder)
    random_tokenizer(r.vocab_size).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.iterdir())


def first_step_time(root: str, options: dict, hub: Path, cache: bool, env: dict) -> float:
    """Seconds from starting ``submit`` to the first optimizer step its trainer takes (read from
    the trainer's heartbeat, written at most every 0.5 s: that is the resolution)."""
    name = f"cold-{uuid.uuid4().hex[:6]}" if not cache else "cold-cached"
    sets = [f"name={name}", f"model.backbone={{pretrained: {hub}}}", "model.quantization=nf4", "model.d_ff=32",
            f"run.backbone_cache={str(cache).lower()}", f"storage.options={json.dumps(options)}", "data.percent=5"]
    argv = [sys.executable, "-m", "orchestrator.cli", "submit", str(TINY), "--root", root]
    for s in sets:
        argv += ["--set", s]
    work = Path(env["TIMELLM_JOB_WORKDIR"])
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while True:
            for beat in work.glob("*/heartbeat-*.json"):
                try:
                    doc = json.loads(beat.read_text())
                except (OSError, ValueError):
                    continue
                if "start_step" in doc and doc.get("step", 0) > doc["start_step"]:
                    return time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"submit exited {proc.returncode}")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    import servers

    tmp = Path(tempfile.mkdtemp(prefix="cold-", dir="/var/tmp"))
    gcs = servers.start_gcs()
    os.environ.update(servers.gcs_env(gcs))
    try:
        hub_bytes = make_hub_folder(tmp / "hub")
        rows = []
        for label, root, options in (("local disk", str(tmp / "root"), {}),
                                     ("GCS emulator", f"gs://{servers.GCS_BUCKET}/cold", servers.gcs_options(gcs))):
            results = {}
            for cache in (False, True):
                samples = []
                for i in range(a.runs + (1 if cache else 0)):
                    work = tmp / f"work-{uuid.uuid4().hex[:6]}"
                    env = {**os.environ, "TIMELLM_JOB_WORKDIR": str(work),
                           "TIMELLM_JOB_BACKBONE_CACHE": str(tmp / f"local-{uuid.uuid4().hex[:6]}")}
                    t = first_step_time(root, options, tmp / "hub", cache, env)
                    if cache and i == 0:
                        continue  # the first cached start builds and writes the cache
                    samples.append(t)
                results[cache] = statistics.median(samples)
            rows.append((label, results[False], results[True]))
        print(f"\nmachine: {machine()}; stand-in hub model: {hub_bytes / 1e6:.0f} MB fp32 "
              f"({SHAPE['num_layers']} layers, hidden {SHAPE['hidden_size']}), quantized to NF4; "
              f"median of {a.runs} fresh starts each\n")
        print("| storage | submit -> first step, no cache (s) | with the job's backbone cache (s) | ratio | target |")
        print("| --- | ---: | ---: | ---: | --- |")
        for label, without, with_cache in rows:
            print(f"| {label} | {without:.1f} | {with_cache:.1f} | {with_cache / without:.2f} | <= 0.5 |")
    finally:
        gcs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
