"""The tiny job with a kill and a preemption in the middle (run by scripts/demo.sh).

1. ``timellm-job submit`` the tiny job (../shared/spec/jobs/tiny-cpu.yaml) under ./runs/demo;
2. SIGKILL its trainer mid-epoch: the orchestrator restarts it from the newest verified checkpoint;
3. SIGTERM the orchestrator (a spot VM's preemption notice): a preempt checkpoint, exit 143;
4. ``submit`` again, as after a new VM boots: it resumes and finishes;
5. ``status`` shows the attempts and checkpoints; ``export-best`` writes the verified model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "spec" / "jobs" / "tiny-cpu.yaml"
ROOT = REPO / "runs" / "demo"
EXPORT = REPO / "runs" / "demo-export"
CLI = [sys.executable, "-m", "timellm_job.orchestrator.cli"]


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def state() -> dict:
    try:
        return json.loads((ROOT / "etth1-tiny-cpu" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_step(step: int) -> dict:
    while True:
        doc = state()
        if (doc.get("heartbeat") or {}).get("step", 0) >= step and doc["attempts"][-1].get("ended_at") is None:
            return doc
        time.sleep(0.2)


def main() -> int:
    spec = Path(sys.argv[1]) if len(sys.argv) > 1 else SPEC
    shutil.rmtree(ROOT, ignore_errors=True)
    shutil.rmtree(EXPORT, ignore_errors=True)
    say(f"submit {spec.name} (storage root {ROOT})")
    proc = subprocess.Popen([*CLI, "submit", str(spec), "--root", str(ROOT)], cwd=REPO)
    doc = wait_step(100)
    pid = doc["attempts"][-1]["pid"]
    say(f"step {doc['heartbeat']['step']}: SIGKILL the trainer (pid {pid}), as an OOM kill or a crash would")
    os.kill(pid, signal.SIGKILL)
    doc = wait_step(250)
    say(f"step {doc['heartbeat']['step']}: SIGTERM to timellm-job, as a spot VM's preemption notice")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    say(f"timellm-job exited {code} (143: preempted, a preempt checkpoint committed)")
    say("submit again, as the new VM's startup script would: it resumes")
    code = subprocess.call([*CLI, "submit", str(spec), "--root", str(ROOT)], cwd=REPO)
    if code != 0:
        return code
    say("status --verify")
    subprocess.call([*CLI, "status", str(spec), "--root", str(ROOT), "--verify",
                     "--plot", str(REPO / "runs" / "demo-loss.png")], cwd=REPO)
    say(f"export-best --out {EXPORT}")
    return subprocess.call([*CLI, "export-best", str(spec), "--root", str(ROOT), "--out", str(EXPORT)], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
