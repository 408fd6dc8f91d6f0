"""``timellm-job sweep --on ray``: each grid point one Ray task that runs the job's ``submit``.

Ray places the tasks on its cluster's nodes and runs a task again when its node dies; the job
itself resumes from storage, so a task run anywhere, any number of times, ends as one run would.
We build no scheduler here: this module only maps a job to a task and a task's end to a rerun.

Invariants:
- A task holds one CPU (Ray gives it ``OMP_NUM_THREADS=1``, so jobs sharing a node do not
  oversubscribe its cores) and, where the cluster has GPUs, one GPU (Ray sets
  ``CUDA_VISIBLE_DEVICES``). ``--max-parallel`` caps the tasks in flight; without it Ray's
  resources alone decide.
- The job's ``submit`` dies with its task (SIGTERM on Linux when the worker goes: it commits a
  preempt checkpoint), so a task that Ray retries never meets a live orphan of itself; an orphan
  of a lost machine is held off by the job's lease, and a writer that lost its lease is fenced.
- A task whose ``submit`` ends preempted, fenced or killed raises ``Rerun`` and Ray runs it again;
  a node lost mid-task is a system failure Ray retries too. Both count towards ``RERUNS``. A job
  that failed or was refused is not run again.
- The driver writes each job's ``sweep.json`` before its task starts and reads the table from
  storage at the end, so the root must be one every node reaches (a bucket, or a shared mount).
- A SIGTERM or SIGINT to the sweep cancels every task; each forwards SIGTERM to its ``submit``
  (preempt checkpoint) before it ends; nothing more starts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from timellm_job.jobs.spec_files import spec_to_yaml
from timellm_job.jobs.sweep import Point, Sweep
from timellm_job.orchestrator.submit import workdir_root
from timellm_job.orchestrator.sweep import RERUNS, again, mark, start_submit, summary

log = logging.getLogger(__name__)

# Run before the job's submit, in its own process: on Linux the kernel sends it SIGTERM when the
# Ray worker that started it dies (PR_SET_PDEATHSIG = 1 survives exec); elsewhere a plain exec.
DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != int(sys.argv[1]):
        sys.exit(143)  # the worker is gone already
os.execv(sys.argv[2], sys.argv[2:])
"""


class Rerun(Exception):
    """The job's submit ended preempted, fenced or killed: Ray runs the task again."""

    def __init__(self, job: str, code: int):
        super().__init__(f"job {job}: submit exited {code}")
        self.job, self.code = job, code

    def __reduce__(self):
        return Rerun, (self.job, self.code)


def run_job(sweep_name: str, name: str, spec_yaml: str) -> int:
    """The Ray task: the job's ``submit`` on this node, to its end; its exit code."""
    import ray

    workdir = workdir_root() / "sweeps" / sweep_name
    workdir.mkdir(parents=True, exist_ok=True)
    proc, log_path = start_submit(workdir, name, spec_yaml, before=(sys.executable, "-c", DIE_WITH_PARENT,
                                                                    str(os.getpid())))
    node = ray.get_runtime_context().get_node_id()
    print(f"sweep {sweep_name}: job {name} started on node {node[:12]} ({socket.gethostname()}; log: {log_path})",
          flush=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # ray.cancel: the sweep is stopping; the job commits a preempt checkpoint
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    print(f"sweep {sweep_name}: job {name} ended with exit {code} on node {node[:12]}", flush=True)
    if again(code):
        raise Rerun(name, code)
    return code


class RayEngine:
    def __init__(self, sweep: Sweep, max_parallel: int | None):
        self.sweep, self.max_parallel = sweep, max_parallel
        self.stopping: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signum

    def run(self) -> int:
        import ray

        # RAY_ADDRESS, else the cluster started on this machine (`ray start`), else a new local one;
        # Ray sets its own SIGTERM handler here, so ours come after
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        try:
            self._run(ray)
        finally:
            ray.shutdown()
        return summary(self.sweep, self.stopping)

    def _run(self, ray) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        task = ray.remote(run_job)
        pending: list[Point] = list(self.sweep.points)
        flying: dict = {}
        cancelled = False
        while pending or flying:
            if self.stopping is not None and not cancelled:
                cancelled = True
                pending.clear()
                for ref in flying:
                    ray.cancel(ref)  # KeyboardInterrupt in the task: its submit preempts
            while pending and (self.max_parallel is None or len(flying) < self.max_parallel):
                point = pending.pop(0)
                mark(self.sweep, point)
                options = task.options(name=point.name, num_cpus=1, num_gpus=1 if gpus else 0,
                                       max_retries=RERUNS, retry_exceptions=[Rerun])
                flying[options.remote(self.sweep.name, point.name, spec_to_yaml(point.spec))] = point
                log.info(f"sweep {self.sweep.name}: job {point.name} handed to Ray"
                         f"{' (one GPU)' if gpus else ''}")
            done, _ = ray.wait(list(flying), num_returns=1, timeout=0.5)
            for ref in done:
                point = flying.pop(ref)
                try:
                    log.info(f"sweep {self.sweep.name}: job {point.name} ended with exit {ray.get(ref)}")
                except ray.exceptions.RayError as err:  # retries spent, cancelled, or the cluster failed
                    log.info(f"sweep {self.sweep.name}: job {point.name} ended: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
