"""The Ray node-loss proof, outside CI: ``sweep --on ray`` on a real local cluster, a node killed.

``python -m benchmarks.ray_node_loss [--out benchmarks/results-ray-node-loss.json]``

Runs ``tests/test_sweep_ray.py`` (it needs the ray extra: ``pip install -e '.[ray]'``): a Ray
cluster of a head and two one-CPU worker nodes on this machine (``ray start``), a sweep of two
quick jobs, the node under one of them killed mid-job (its raylet, Ray worker, submit and
trainer, by SIGKILL at once). The test asserts that Ray runs the job again on the other node and
that both jobs end bit-identical to their uninterrupted solo runs. CI skips that file (Ray is not
in its install, to keep the suite within its budget); this command runs it and records what it
printed, whether it passed, how long it took and on what machine, as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/test_sweep_ray.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-ray-node-loss.json"))
    args = parser.parse_args()
    started = time.time()
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # Ray colours its prefixes
    passed = done.returncode == 0 and re.search(r"\b1 passed\b", out) is not None
    result = {"benchmark": "ray_node_loss", "machine": machine(), "ray": version("ray"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "command": f"python -m pytest -q -s {TEST}", "passed": passed, "exit": done.returncode,
              "wall_s": round(wall, 1),
              "rerun": next(iter(re.findall(r"node \S+ killed; job .*? later", out)), None),
              "output": out.splitlines()[-60:]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{machine()}\nray {result['ray']}: {'passed' if passed else 'FAILED'} in {wall:.0f} s; "
          f"{result['rerun']}\nwrote {args.out}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
