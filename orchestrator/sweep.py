"""``timellm-job sweep``: every grid point an ordinary job, placed by an engine.

We do not build a scheduler: each job is an ordinary ``submit`` of its own spec (its own folder,
lease, spec and restarts), safe to run anywhere; the engine only decides where and when. This
module is the ``local`` engine (up to ``--max-parallel`` jobs at once on this machine) and what
every engine shares: which exits are run again, the job's ``sweep.json``, the closing table.
The ``ray`` and ``skypilot`` engines are orchestrator/sweep_ray.py and sweep_sky.py.

Invariants:
- Running a sweep again trains nothing that completed (its ``submit`` says so and exits 0) and
  resumes the rest; a changed base or grid point is refused by that job's ``submit``, as a
  changed job is.
- Jobs running at once share the machine: the CPU threads are divided between them
  (orchestrator.threads), and where there are GPUs each job gets one (``CUDA_VISIBLE_DEVICES``),
  never more jobs at once than GPUs.
- A job that ends preempted, fenced or lost (its ``submit`` killed) is run again, at most
  ``RERUNS`` times; one that failed or was refused is not. A SIGTERM or SIGINT to the sweep
  reaches every running ``submit`` (each commits its preempt checkpoint) and nothing more starts.
- Each job folder gets ``sweep.json`` (the sweep's name and the job's grid fields, what ``table``
  shows) before its ``submit`` starts; a bad sweep file is refused before anything is written.
- Exit 0 when every job completed, 1 when any did not, 130/143 when the sweep was stopped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from timellm_job.jobs.protocol import ExitCode
from timellm_job.jobs.spec_files import spec_to_yaml
from timellm_job.jobs.sweep import Point, Sweep
from timellm_job.orchestrator.results_table import SWEEP_FIELDS, markdown, row
from timellm_job.orchestrator.threads import thread_env
from timellm_job.storage import StorageError, job_store
from timellm_job.storage.documents import read_json, write_json
from timellm_job.storage.private import write_private

log = logging.getLogger(__name__)

RERUNS = 3  # a job preempted, fenced or lost this many times in one sweep is given up
AGAIN = {ExitCode.FENCED, ExitCode.SIGINT, ExitCode.KILLED, ExitCode.SIGTERM}  # and any death by a signal


def gpu_count() -> int:
    """GPUs on this machine, from ``nvidia-smi -L`` (no torch here); 0 without one."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def again(code: int) -> bool:
    """Whether a job's ``submit`` that exited with ``code`` is run again: preempted, fenced or
    lost (killed by a signal: its runtime died); not one that completed, failed or was refused."""
    return code in AGAIN or code < 0


def start_submit(workdir: Path, name: str, spec_yaml: str, env: dict[str, str] | None = None,
                 before: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """The job's own ``timellm-job submit`` in this Python, its own session, on the spec written
    beside its log in ``workdir`` (0600: credentials never in an argv); ``before``: what runs it.
    The process and the log its output goes to."""
    spec_path, log_path = workdir / f"{name}.yaml", workdir / f"{name}.log"
    write_private(spec_path, spec_yaml.encode())
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([*before, sys.executable, "-m", "timellm_job.orchestrator.cli", "submit", str(spec_path)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return proc, log_path


def mark(sweep: Sweep, point: Point) -> None:
    """The job's grid fields beside it (what ``table`` shows); a store that fails here is the
    job's own submit's to report, not a reason to stop the other jobs."""
    job = job_store(point.spec.storage.root, point.name, point.spec.storage.options)
    doc = {"sweep": sweep.name, "fields": point.fields}
    try:
        try:
            same = read_json(job, SWEEP_FIELDS) == doc
        except ValueError:
            same = False
        if not same:
            write_json(job, SWEEP_FIELDS, doc)
    except StorageError as err:
        log.warning(f"warning: sweep {sweep.name}: could not write {point.name}/{SWEEP_FIELDS}: {err}")


def summary(sweep: Sweep, stopping: int | None) -> int:
    """The sweep's table, from storage, and its exit code: 0 when every job completed, 1 when any
    did not, 130/143 when the sweep was stopped by SIGINT/SIGTERM."""
    rows = [row(job_store(p.spec.storage.root, p.name, p.spec.storage.options), p.name) for p in sweep.points]
    print(markdown(rows), end="", flush=True)
    if stopping is not None:
        return ExitCode.SIGINT if stopping == signal.SIGINT else ExitCode.SIGTERM
    done = [r for r in rows if r["phase"] == "completed"]
    log.info(f"sweep {sweep.name}: {len(done)} of {len(rows)} jobs completed")
    return ExitCode.OK if len(done) == len(rows) else ExitCode.FAILED


@dataclass
class Running:
    point: Point
    proc: subprocess.Popen
    slot: int


class LocalEngine:
    def __init__(self, sweep: Sweep, workdir: Path, max_parallel: int):
        self.sweep, self.workdir = sweep, workdir
        self.gpus = gpu_count()
        self.parallel = max(1, min(max_parallel, self.gpus) if self.gpus else max_parallel)
        self.stopping: int | None = None  # the signal that stopped the sweep
        self.runs: collections.Counter[str] = collections.Counter()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signum

    def _start(self, point: Point, slot: int) -> Running:
        mark(self.sweep, point)
        env = {**os.environ, **thread_env(self.parallel)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        proc, log_path = start_submit(self.workdir, point.name, spec_to_yaml(point.spec), env)
        self.runs[point.name] += 1
        log.info(f"sweep {self.sweep.name}: job {point.name} started (run {self.runs[point.name]}, "
                 f"slot {slot}{f', GPU {slot % self.gpus}' if self.gpus else ''}; log: {log_path})")
        return Running(point, proc, slot)

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        pending = collections.deque(self.sweep.points)
        running: list[Running] = []
        forwarded = False
        while pending or running:
            if self.stopping is not None and not forwarded:
                forwarded = True
                for r in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(r.proc.pid, self.stopping)  # each submit preempts its trainer
            while pending and len(running) < self.parallel and self.stopping is None:
                free = min(set(range(self.parallel)) - {r.slot for r in running})
                running.append(self._start(pending.popleft(), free))
            for r in list(running):
                code = r.proc.poll()
                if code is None:
                    continue
                running.remove(r)
                if self.stopping is None and again(code) and self.runs[r.point.name] <= RERUNS:
                    log.info(f"sweep {self.sweep.name}: job {r.point.name} ended with exit {code}: run again")
                    pending.append(r.point)
                else:
                    log.info(f"sweep {self.sweep.name}: job {r.point.name} ended with exit {code}")
            time.sleep(0.2)
        return summary(self.sweep, self.stopping)
