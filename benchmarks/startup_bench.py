"""Start-up to the first training step, cold and with warm spares (issue 24, item 7).

    python -m benchmarks.startup_bench [--runs 5]

The demo's tiny job (shared/spec/jobs/tiny-cpu.yaml, one epoch) on this machine, two ways:
``run.warm_spare: false`` (every trainer starts cold, as before warm spares) and the default
(warm spares; the restart's spare started as soon as the attempt trains,
``TIMELLM_JOB_SPARE_AFTER_S=0``, and the kill waits until it is ready: blocked reading its
claim). Per run, on a fresh job:

- first attempt: ``submit`` started -> the job's first training step;
- restart: the trainer SIGKILLed at step 5 -> the restarted trainer's first step; and that
  trainer's own start-up (its start -> its first step; its start-up marks in the heartbeat);
- what a ready spare costs: its memory (RSS, and USS: what it alone holds) and the CPU time of
  its imports.

Medians over the runs; the raw numbers go to benchmarks/results-startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import TINY_SPEC, machine
from tests.cli import heartbeat, spares_of, wait_until

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results-startup.json"
KILL_AT_STEP = 5
POLL_S = 0.02


def _spare_ready(submit: subprocess.Popen, trainer: int) -> dict | None:
    """A spare of ``submit`` (not its trainer) blocked reading its claim (its imports are done):
    what it costs, its memory and the CPU time its imports took."""
    for p in spares_of(submit, {trainer}):
        try:
            if "pipe" in Path(f"/proc/{p.pid}/wchan").read_text():
                mem, cpu = p.memory_full_info(), p.cpu_times()
                return {"rss_mib": round(mem.rss / 2**20, 1), "uss_mib": round(mem.uss / 2**20, 1),
                        "cpu_s": round(cpu.user + cpu.system, 2)}
        except (psutil.Error, OSError):
            pass
    return None


def one_run(warm: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    work, job = tmp / "work", tmp / "runs" / "etth1-tiny-cpu"
    env = {**os.environ, "TIMELLM_JOB_WORKDIR": str(work), "TIMELLM_JOB_SPARE_AFTER_S": "0"}
    args = [sys.executable, "-m", "timellm_job.orchestrator.cli", "submit", str(TINY_SPEC), "--root", str(tmp / "runs"),
            "--set", "train.epochs=1", "--set", f"run.warm_spare={'true' if warm else 'false'}"]
    started = time.time()
    submit = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_until(lambda: (heartbeat(work, 1).get("startup") or {}).get("first_step"), "the first step",
                           poll=POLL_S, alive=[submit])
        wait_until(lambda: heartbeat(work, 1).get("step", 0) >= KILL_AT_STEP, f"step {KILL_AT_STEP}", poll=POLL_S,
                   alive=[submit])
        trainer = json.loads((job / "state.json").read_text())["attempts"][-1]["pid"]
        spare = wait_until(lambda: _spare_ready(submit, trainer), "a ready spare", poll=POLL_S,
                           alive=[submit]) if warm else None
        killed = time.time()
        os.kill(trainer, signal.SIGKILL)
        marks = wait_until(lambda: (s := heartbeat(work, 2).get("startup") or {}).get("first_step") and s,
                           "the restart's first step", poll=POLL_S, alive=[submit])
        attempt = [a for a in json.loads((job / "state.json").read_text())["attempts"] if a["number"] == 2][0]
        return {"first_attempt_s": round(first - started, 3),
                "restart_s": round(marks["first_step"] - killed, 3),
                "restart_trainer_startup_s": round(marks["first_step"] - attempt["started_at"], 3),
                "restart_marks_s": {k: round(v - attempt["started_at"], 3) for k, v in sorted(marks.items())},
                "restart_warm": attempt.get("warm_spare", False), "spare": spare}
    finally:
        submit.send_signal(signal.SIGINT)
        submit.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    raw: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(a.runs):  # interleaved, so a machine that slows down slows both
        for mode in raw:
            raw[mode].append(one_run(mode == "warm"))
            print(mode, raw[mode][-1], flush=True)
    medians = {mode: {key: statistics.median(r[key] for r in runs)
                      for key in ("first_attempt_s", "restart_s", "restart_trainer_startup_s")}
               for mode, runs in raw.items()}
    medians["spare"] = {key: statistics.median(r["spare"][key] for r in raw["warm"])
                        for key in ("rss_mib", "uss_mib", "cpu_s")}
    result = {"benchmark": "startup_bench", "machine": machine(), "runs": a.runs, "spec": "tiny-cpu.yaml, 1 epoch",
              "kill_at_step": KILL_AT_STEP, "medians": medians, "raw": raw}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
