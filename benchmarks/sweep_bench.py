"""A sweep of quick jobs on the ``local`` engine: wall time three ways, and a run under chaos.

``python -m benchmarks.sweep_bench [--jobs 8] [--runs 3] [--seed 0] [--out benchmarks/results-sweep.json]``

The sweep is the tests' quick job (tests/jobfiles.quick_spec: 700 rows of ETTh1, 3 epochs, 78
steps) over ``train.seed`` 1..``--jobs``, each case under a root of its own:

- ``one after another``: ``--max-parallel 1``. Each job runs alone and uninterrupted: its final
  checkpoint, best checkpoint and results are the solo run every other case must reproduce.
- ``two at once, divided``: ``--max-parallel 2``, as the product runs them (each job's processes
  get usable cores // 2 intra-op threads, orchestrator.threads).
- ``two at once, torch's threads``: ``--max-parallel 2`` with ``OMP_NUM_THREADS`` set to the
  machine's cores, which the product keeps (a user's setting wins): each job as many threads as
  cores, as torch does unset. Capped at ``--cap`` times the sequential median; a sweep still
  running then is stopped and recorded as not finished.
- ``two at once, chaos``: ``--max-parallel 2`` with slowed steps (tests/faults) and random
  events until the sweep ends: a running trainer SIGKILLed (its submit restarts it) or a running
  submit sent SIGTERM (a preemption: it commits a preempt checkpoint and exits 143; the sweep runs
  it again). At most two preemptions per job (the sweep reruns a job three times); a trainer is
  killed only once its heartbeat shows a step taken since it started (three kills of a trainer
  still starting, at one step, are a crash loop, which the product fails as it should).

Every job of every finished case is checked bit for bit against its solo run (the final and best
checkpoints' hashes and the results). Prints the machine and the median wall time of each case,
and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from benchmarks.common import machine, with_faults
from tests.cli import is_trainer
from tests.jobfiles import final_state, quick_spec

REPO = Path(__file__).resolve().parents[1]
SLOW = {"TIMELLM_JOB_TEST_STEP_DELAY_S": "0.08", "TIMELLM_JOB_TEST_WRITE_DELAY_S": "0.03"}


def _env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return with_faults({**env, "TIMELLM_JOB_WORKDIR": str(work), "TIMELLM_JOB_LEASE_TTL_S": "6",
                        "TIMELLM_JOB_BACKBONE_CACHE": str(work.parent / "backbones"), **(extra or {})})


def _sweep(folder: Path, jobs: int) -> Path:
    base = quick_spec(folder, name="bench")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "bench", "base": str(base), "grid": {"train.seed": list(range(1, jobs + 1))}}))
    return path


def _names(jobs: int) -> list[str]:
    return [f"bench-seed{i}" for i in range(1, jobs + 1)]


def _run(sweep: Path, root: Path, parallel: int, env: dict[str, str], cap_s: float | None = None,
         chaos: random.Random | None = None) -> dict:
    """One sweep to its end (or to ``cap_s``): wall seconds, exit code, the events that hit it."""
    cmd = [sys.executable, "-m", "timellm_job.orchestrator.cli", "sweep", str(sweep), "--root", str(root),
           "--max-parallel", str(parallel)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    events: list[dict] = []
    stop = threading.Event()
    killer = threading.Thread(target=_chaos, args=(proc, root, chaos, events, stop), daemon=True) if chaos else None
    if killer:
        killer.start()
    try:
        out, _ = proc.communicate(timeout=cap_s)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # every submit commits a preempt checkpoint
        out, _ = proc.communicate(timeout=600)
        finished = False
    stop.set()
    if killer:
        killer.join()
    wall = time.perf_counter() - t
    ends = {}
    for state in sorted(root.glob("*/state.json")):
        doc = json.loads(state.read_text())
        ends[state.parent.name] = {"phase": doc.get("phase"), "reason": doc.get("reason"),
                                   "attempts": len(doc.get("attempts") or [])}
    completed = sum(1 for end in ends.values() if end["phase"] == "completed")
    return {"wall_s": round(wall, 2), "exit": proc.returncode, "finished": finished, "jobs_completed": completed,
            "jobs": ends,
            "events": events, "output_tail": out.splitlines()[-14:]}


def _processes(root: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The sweep's running submits (their specs lie in the sweep's work folder), and those of their
    trainers that have taken a step since they started (a kill gated on observed progress: three
    kills of trainers still starting, at one step, are a crash loop, which fails the job)."""
    submits = [p for p in psutil.process_iter(["cmdline"])
               if "timellm_job.orchestrator.cli" in (p.info.get("cmdline") or []) and "submit" in p.info["cmdline"]
               and "/sweeps/bench/" in p.info["cmdline"][-1] and str(root.name) in p.info["cmdline"][-1]]
    trainers = []
    for submit in submits:
        try:
            job = Path(submit.cmdline()[-1]).stem
            beat = json.loads((root / job / "state.json").read_text()).get("heartbeat") or {}
            trainers += [c for c in submit.children(recursive=True) if is_trainer(c.cmdline())
                         and beat.get("pid") == c.pid and (beat.get("step") or 0) > (beat.get("start_step") or 0)]
        except (psutil.NoSuchProcess, OSError, ValueError):
            continue
    return submits, trainers


def _chaos(proc: subprocess.Popen, root: Path, rng: random.Random, events: list[dict], stop: threading.Event) -> None:
    preempted: Counter[str] = Counter()
    while not stop.wait(rng.uniform(2.0, 6.0)) and proc.poll() is None:
        submits, trainers = _processes(root)
        kinds = (["trainer SIGKILL"] if trainers else []) + (["preempt (SIGTERM)"] if submits else [])
        if not kinds:
            continue
        kind = rng.choice(kinds)
        try:
            if kind == "trainer SIGKILL":
                victim = rng.choice(trainers)
                victim.send_signal(signal.SIGKILL)
                events.append({"t": time.time(), "event": kind, "pid": victim.pid})
            else:
                victim = rng.choice(submits)
                job = Path(victim.cmdline()[-1]).stem
                if preempted[job] >= 2:
                    continue
                preempted[job] += 1
                victim.send_signal(signal.SIGTERM)
                events.append({"t": time.time(), "event": kind, "job": job, "pid": victim.pid})
        except psutil.NoSuchProcess:
            continue


def _identical(root: Path, names: list[str], solo: dict[str, dict]) -> dict[str, bool]:
    out = {}
    for name in names:
        try:
            out[name] = final_state(root / name) == solo[name]
        except Exception:  # noqa: BLE001 - a job without a final checkpoint is simply not identical
            out[name] = False
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", type=float, default=4.0, help="torch's-threads case: times the sequential median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-sweep.json"))
    parser.add_argument("--only", choices=["sequential", "divided", "threads", "chaos"], action="append",
                        help="run only these cases (repeatable); the others are kept from --out as they are "
                             "(the solo runs are made again, unrecorded, when 'sequential' is not among them)")
    args = parser.parse_args()
    only = set(args.only or ["sequential", "divided", "threads", "chaos"])
    kept = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else {}
    names = _names(args.jobs)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        sweep = _sweep(tmp, args.jobs)
        cases: dict[str, list[dict]] = dict(kept.get("cases") or {})
        solo: dict[str, dict] = {}

        def case(label: str, parallel: int, extra: dict | None = None, runs: int = args.runs,
                 record: bool = True, **kw) -> None:
            if record:
                cases[label] = []
            for i in range(runs):
                root = tmp / f"{label.replace(' ', '-').replace(',', '')}-{i}"
                res = _run(sweep, root, parallel, _env(tmp / f"work-{root.name}", extra), **kw)
                if label == "one after another" and i == 0:
                    solo.update({n: final_state(root / n) for n in names})
                res["bit_identical"] = _identical(root, names, solo) if res["finished"] else None
                if record:
                    cases[label].append(res)
                print(f"{label} (run {i + 1}): {res['wall_s']:.1f} s, exit {res['exit']}, "
                      f"{'finished' if res['finished'] else 'NOT finished'}, {res['jobs_completed']} jobs completed"
                      + (f", bit-identical {sum(res['bit_identical'].values())}/{len(names)}"
                         if res["bit_identical"] else "")
                      + (f", {len(res['events'])} events" if res["events"] else ""), flush=True)

        case("one after another", 1, runs=args.runs if "sequential" in only else 1, record="sequential" in only)
        if "divided" in only:
            case("two at once, divided", 2)
        sequential = statistics.median(r["wall_s"] for r in cases["one after another"])
        if "threads" in only:
            case("two at once, torch's threads", 2, {"OMP_NUM_THREADS": str(cores)}, runs=1,
                 cap_s=args.cap * sequential)
        if "chaos" in only:
            case("two at once, chaos", 2, SLOW, runs=1, chaos=random.Random(args.seed))
    summary = {label: {"median_wall_s": statistics.median(r["wall_s"] for r in runs),
                       "runs": len(runs), "all_finished": all(r["finished"] for r in runs),
                       # None: a run did not finish, so there is nothing to compare
                       "all_bit_identical": all(all(r["bit_identical"].values()) for r in runs)
                       if all(r["finished"] for r in runs) else None}
               for label, runs in cases.items()}
    result = {"benchmark": "sweep_bench", "machine": machine(), "jobs": args.jobs, "runs": args.runs,
              "started": kept.get("started", started), "summary": summary, "cases": cases,
              # the cases run again later with --only, and when
              "rerun": {**(kept.get("rerun") or {}), **({c: started for c in only} if args.only else {})}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(machine())
    for label, s in summary.items():
        print(f"{label}: median {s['median_wall_s']:.1f} s over {s['runs']} run(s); finished: {s['all_finished']}; "
              f"bit-identical to the solo runs: {s['all_bit_identical']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
