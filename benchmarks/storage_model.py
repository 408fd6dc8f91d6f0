"""The storage state machine (tests/test_storage_model.py) run long: thousands of examples, seeded.

    .venv/bin/python -m benchmarks.storage_model [--examples 5000] [--steps 30] [--seed 20261202]
                                                 [--out benchmarks/results-storage-model.json]

CI runs the same machine for a bounded number of examples; this runs it as long as you like and
writes what ran (seed, examples, steps per example, the machine, the seconds it took, the
outcome and, on a failure, Hypothesis's minimal failing sequence) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results-storage-model.json"))
    a = ap.parse_args()
    env = {**os.environ, "TIMELLM_TEST_STORAGE_MODEL_EXAMPLES": str(a.examples),
           "TIMELLM_TEST_STORAGE_MODEL_STEPS": str(a.steps)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_storage_model.py",
                           f"--hypothesis-seed={a.seed}", "--timeout=0"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.time() - started
    tail = (proc.stdout + proc.stderr)[-6000:]
    doc = {"benchmark": "storage state machine", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "seed": a.seed, "examples": a.examples, "steps_per_example": a.steps, "seconds": round(seconds, 1),
           "passed": proc.returncode == 0, "output_tail": tail if proc.returncode else tail[-600:]}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "output_tail"}, indent=1))
    if proc.returncode:
        print(tail, file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
