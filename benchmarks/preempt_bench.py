"""The preempt path's commit against slow object stores: from SIGTERM to exit, for the
Llama-3-sized trainable state (Time-LLM over Llama-3-8B: 141.7M trainable parameters + Adam,
1.70 GB), on moto S3 and the GCS emulator, each behind the faulty proxy throttled to one shared
link of 100 MB/s.

    python -m benchmarks.preempt_bench [--rate-mb 100] [--runs 1]

A child process holds the state in host memory (as the trainer's capture leaves it) and waits
in a loop, as a trainer between steps does; on SIGTERM it commits a ``preempt`` checkpoint
through the trainer's own saver (``CheckpointSaver.submit(..., wait=True)``: hashes, uploads,
create-only manifest, retention) and exits 143. The parent sends SIGTERM and times until the
child has exited, then verifies the checkpoint by its hashes. Not included: finishing the step
in progress and the capture from GPU to host memory (0.03 s on the H100, benchmarks/README.md).
The number to compare is the grace period (25 s, inside GCE's 30 s): at 100 MB/s the bytes
alone take 17 s. Prints a table and a JSON line; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, signal, sys, time
from benchmarks.common import llama3_trainable_state
from timellm_job.storage import job_store
from timellm_job.trainer.saver import CheckpointSaver
from timellm_job.trainer.checkpoint_state import Snapshot

params = llama3_trainable_state()
moments = {}
for i, (name, t) in enumerate(sorted(params.items())):
    moments[f"state.{i}.exp_avg"] = t * 0.1
    moments[f"state.{i}.exp_avg_sq"] = t * t
    moments[f"state.{i}.step"] = t.new_tensor(100.0)
snapshot = Snapshot(params, moments, {"progress": {"global_step": 100}})
job = job_store(sys.argv[1], "preempt", json.loads(sys.argv[2]))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(time.time()))
print("ready", sum(t.numel() * t.element_size() for t in [*params.values(), *moments.values()]), flush=True)
while not stop:
    time.sleep(0.01)  # a trainer between steps
saver = CheckpointSaver(job, "bench", 2, background=False)
saver.submit(snapshot, 100, "preempt", [100], {}, wait=True)
print("committed", json.dumps({"signal_to_committed_s": time.time() - stop[0]}), flush=True)
sys.exit(143)
"""


def one(root: str, options: dict) -> dict:
    from timellm_job.storage import job_store, list_checkpoints, verify

    child = subprocess.Popen([sys.executable, "-c", CHILD, root, json.dumps(options)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    ready = child.stdout.readline().split()
    assert ready and ready[0] == "ready", ready
    state_bytes = int(ready[1])
    time.sleep(0.5)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out = child.stdout.read()
    child.wait()
    exited = time.monotonic() - sent
    job = job_store(root, "preempt", options)
    (manifest,) = list_checkpoints(job).committed
    problems = verify(job, manifest, hashes=True)
    committed = json.loads(out.split("committed", 1)[1])["signal_to_committed_s"] if "committed" in out else None
    return {"exit_code": child.returncode, "sigterm_to_exit_s": round(exited, 2),
            "sigterm_to_committed_s": round(committed, 2) if committed else None,
            "state_bytes": state_bytes, "checkpoint_bytes": manifest.bytes, "verified": not problems}


def main() -> None:
    from tests import servers
    from tests.faulty_proxy import FaultyProxy

    ap = argparse.ArgumentParser()
    ap.add_argument("--rate-mb", type=float, default=100.0, help="the proxy's shared link, MB/s (1 MB = 10^6 bytes)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", help="write the JSON here")
    a = ap.parse_args()
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    results = {"machine": machine(), "rate_mb_s": a.rate_mb, "grace_period_s": 25, "stores": {}}
    for kind in ("s3", "gcs"):
        server = servers.start_s3() if kind == "s3" else servers.start_gcs()
        proxy = FaultyProxy(server.url, every=0, rate=a.rate_mb * 1e6)
        try:
            runs = []
            for _ in range(a.runs):
                if kind == "s3":
                    import s3fs

                    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": proxy.url}}
                    bucket = f"preempt-{uuid.uuid4().hex[:6]}"
                    s3fs.S3FileSystem(**options).mkdir(bucket)
                    root = f"s3://{bucket}/jobs"
                else:
                    options = {"token": "anon", "endpoint_url": proxy.url}
                    root = f"gs://{servers.GCS_BUCKET}/preempt-{uuid.uuid4().hex[:6]}"
                runs.append(one(root, options))
                print(kind, runs[-1], flush=True)
            results["stores"][kind] = runs
        finally:
            proxy.stop()
            server.stop()
    print(f"\nmachine: {results['machine']}; link {a.rate_mb:.0f} MB/s through the proxy\n")
    print("| store | checkpoint | SIGTERM -> committed | SIGTERM -> exit | verified | grace |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for kind, runs in results["stores"].items():
        for r in runs:
            print(f"| {kind} | {r['checkpoint_bytes'] / 1e9:.2f} GB | {r['sigterm_to_committed_s']} s | "
                  f"{r['sigterm_to_exit_s']} s | {r['verified']} | 25 s |")
    line = json.dumps(results)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
