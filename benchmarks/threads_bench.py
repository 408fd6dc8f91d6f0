"""Two trainers on one machine: torch's own thread count against the product's division.

``python -m benchmarks.threads_bench [--steps 40] [--runs 3] [--out results-threads.json]``

Each case runs the tiny job's real trainer (``python -m timellm_job.trainer run``, the demo's
spec, its backbone cached first) and reads its training rate from its own heartbeat
(``steps_per_s``: steps since it started training over the time since) once it has taken
``--steps`` steps; the trainer is then killed, so evaluation, which takes minutes when the
threads fight, is not part of it. Cases:

- ``alone``: one trainer, torch's thread count (nothing set);
- ``two, torch's threads``: two at once, nothing set: each sizes its pool by the machine's cores;
- ``two, divided``: two at once with the environment the orchestrator gives processes started
  together (orchestrator.threads.thread_env: usable cores // 2 each).

Prints the machine, the median rate per process of each case over ``--runs`` runs, and writes the
raw numbers as JSON.
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

from benchmarks.common import TINY_SPEC, machine
from timellm_job.orchestrator.threads import THREAD_VARS, thread_env, usable_cores

REPO = Path(__file__).resolve().parents[1]


def _env(work: Path, extra: dict[str, str], heartbeat: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, **extra, "TIMELLM_JOB_HEARTBEAT": str(heartbeat), "TIMELLM_JOB_HEARTBEAT_INTERVAL_S": "0",
            "TIMELLM_JOB_BACKBONE_CACHE": str(work / "backbones")}


def _rate(heartbeat: Path) -> tuple[int, float]:
    try:
        doc = json.loads(heartbeat.read_text())
    except (OSError, ValueError):
        return 0, 0.0
    return (doc.get("step") or 0) - (doc.get("start_step") or 0), doc.get("steps_per_s") or 0.0


def run_case(work: Path, processes: int, extra: dict[str, str], steps: int) -> list[float]:
    """Start ``processes`` trainers at once; each one's rate once it has taken ``steps`` steps."""
    procs, beats = [], []
    for i in range(processes):
        root, beat = work / f"root-{i}", work / f"heartbeat-{i}.json"
        shutil.rmtree(root, ignore_errors=True)
        beat.unlink(missing_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "timellm_job.trainer", "run", str(TINY_SPEC), "--root",
                                       str(root), "--set", "train.epochs=1"], cwd=REPO, env=_env(work, extra, beat),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        beats.append(beat)
    rates: list[float | None] = [None] * processes
    deadline = time.monotonic() + 3600
    try:
        while None in rates:
            assert time.monotonic() < deadline, "no progress in an hour"
            for i, beat in enumerate(beats):
                taken, rate = _rate(beat)
                if rates[i] is None and taken >= steps:
                    rates[i] = rate
                    os.killpg(procs[i].pid, signal.SIGKILL)  # its rate is read: it stops competing
                assert rates[i] is not None or procs[i].poll() is None, f"trainer {i} ended early"
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results-threads.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="threads-bench-", dir="/var/tmp"))
    try:
        run_case(work, 1, {}, 2)  # the backbone cache is built once, outside the timings
        cases = {"alone": (1, {}), "two, torch's threads": (2, {}), "two, divided": (2, thread_env(2, {}))}
        raw: dict[str, list[list[float]]] = {name: [] for name in cases}
        for _ in range(a.runs):
            for name, (n, extra) in cases.items():
                raw[name].append(run_case(work, n, extra, a.steps))
        result = {"machine": machine(), "usable_cores": usable_cores(), "steps": a.steps, "runs": a.runs,
                  "divided_env": thread_env(2, {}), "date": time.strftime("%Y-%m-%d"), "raw_steps_per_s": raw,
                  "median_steps_per_s_per_process": {k: statistics.median(r for run in v for r in run)
                                                     for k, v in raw.items()}}
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"machine: {result['machine']}; usable cores {result['usable_cores']}; "
              f"{a.steps} training steps per trainer; median of {a.runs} runs\n")
        print("| case | steps/s per process | against alone |")
        print("| --- | ---: | ---: |")
        alone = result["median_steps_per_s_per_process"]["alone"]
        for name, v in result["median_steps_per_s_per_process"].items():
            print(f"| {name} | {v:.2f} | {v / alone:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
