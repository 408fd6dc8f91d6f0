"""``timellm-job sweep --on skypilot``: each grid point one SkyPilot managed job.

SkyPilot places the jobs on spot VMs and relaunches a job's VM after a preemption; every launch
runs the job's ``submit``, which resumes from the newest verified checkpoint in the bucket. The
task is the project's own (docker/skypilot-task.yaml), built with SkyPilot's own loader; only
the job's spec (``JOB_SPEC``, a URL the VM reads) and the ``HF_TOKEN`` secret differ per job.
SkyPilot's pins clash with ours, so it runs in its own environment: the Python of the ``sky``
command on PATH runs orchestrator/sky_launcher.py, which speaks SkyPilot's Python API.

Invariants:
- Every check comes before the first launch: a root or data path a VM cannot reach, credentials
  in the spec, a grid point that changed a job already started, no ``sky`` on PATH, a missing
  task file, or a task SkyPilot's loader refuses (every task is built once first) exit 2 naming
  the field, with nothing written and nothing launched.
- A job that completed is not launched again, nor one whose lease a live submit holds (it runs
  somewhere already); every other job is launched. Each job's spec for the VM is stored beside
  it (``launch.yaml``, private) before its launch.
- ``HF_TOKEN`` travels as a SkyPilot secret (redacted by SkyPilot), never as a plain env var.
- The launch goes through ``launch(request)`` (one job, sky_launcher's request): SkyPilot's
  ``jobs.launch`` by default, a recorder in the tests (no cloud is reachable there).
- After launching, the sweep watches storage until every job completed or failed (exit 0 / 1).
  SIGINT or SIGTERM detaches: the managed jobs run on (``sky jobs cancel`` stops them), and the
  sweep exits 130/143; running it again launches nothing that runs or completed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from timellm_job.jobs.spec_files import spec_to_yaml
from timellm_job.jobs.sweep import Point, Sweep
from timellm_job.orchestrator.identity import identify
from timellm_job.orchestrator.redaction import redacted
from timellm_job.orchestrator.status_view import summary as job_summary
from timellm_job.orchestrator.submit import InputError, check_stored_spec
from timellm_job.orchestrator.sweep import mark, summary
from timellm_job.storage import job_store
from timellm_job.storage import lease as leases

log = logging.getLogger(__name__)

TASK_FILE = Path("docker") / "skypilot-task.yaml"
LAUNCHER = Path(__file__).with_name("sky_launcher.py")
LAUNCH_SPEC = "launch.yaml"  # in the job's folder: the spec its VM runs
BUCKETS = ("gs://", "s3://")
FINAL = {"completed", "failed"}
Request = dict[str, Any]


class SkyPilotError(Exception):
    """SkyPilot could not launch a job (its own words)."""


def project_root() -> Path | None:
    """The checkout whose task file and code the VMs get (``workdir``): this one, or the one the
    package runs from."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / TASK_FILE).is_file():
            return base
    return None


def sky_python() -> str | None:
    """The Python that SkyPilot's ``sky`` command on PATH runs (its ``#!`` line); None without one."""
    found = shutil.which("sky")
    if found is None:
        return None
    try:
        with open(found, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if words and words[0].endswith("/env") and len(words) > 1:
        return shutil.which(words[-1])
    return words[0] if words else None


def ask_skypilot(python: str, request: Request) -> dict:
    """Run sky_launcher.py in SkyPilot's Python; its answer. A task SkyPilot refuses is InputError
    (exit 2), a launch that fails SkyPilotError."""
    done = subprocess.run([python, str(LAUNCHER)], input=json.dumps(request), capture_output=True, text=True,
                          timeout=300 if request["mode"] == "build" else None)
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if done.returncode == 2 and "error" in answer:
        raise InputError(answer["error"])
    if done.returncode != 0 or "jobs" not in answer:
        raise SkyPilotError(answer.get("error") or f"{python} {LAUNCHER.name}: exit {done.returncode}: "
                            f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return answer


def check(point: Point) -> None:
    """What keeps this job from running on a VM of its own (InputError naming the field)."""
    spec = point.spec
    for field, value in (("storage.root", spec.storage.root), ("data.path", spec.data.path)):
        if not value.startswith(BUCKETS):
            raise InputError(f"{field}: {value!r}: a SkyPilot job runs on a VM of its own, which reads only "
                             "a bucket: give a gs://... or s3://... URL")
    if redacted(spec.storage.options) != spec.storage.options:
        raise InputError("storage.options: credentials cannot travel to a SkyPilot VM in the job's spec; "
                         "let the VM's own cloud identity reach the bucket (SkyPilot gives it one)")
    job = job_store(spec.storage.root, point.name, spec.storage.options)
    check_stored_spec(job, spec, identify(spec, job))


class SkyPilotEngine:
    def __init__(self, sweep: Sweep, launch: Callable[[Request], dict] | None = None, python: str | None = None,
                 poll_s: float = 30.0, hf_token: str | None = None):
        self.sweep, self.poll_s = sweep, poll_s
        self.python = python or sky_python()
        self.launch = launch or (lambda request: ask_skypilot(self.python, request))
        self.hf_token = hf_token if hf_token is not None else os.environ.get("HF_TOKEN")
        self.stopping: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signum

    def _store(self, point: Point):
        return job_store(point.spec.storage.root, point.name, point.spec.storage.options)

    def request(self, mode: str, base: Path, points: list[Point]) -> Request:
        """sky_launcher's request: the project's task file, and per job its spec's URL and secrets."""
        return {"mode": mode, "config": yaml.safe_load((base / TASK_FILE).read_text()), "workdir": str(base),
                "jobs": [{"name": p.name, "envs": {"JOB_SPEC": self._store(p).url_of(LAUNCH_SPEC)},
                          "secrets": {"HF_TOKEN": self.hf_token} if self.hf_token else {}} for p in points]}

    def checked(self) -> Path:
        """Every check, before anything is written or launched (InputError); the project's root."""
        base = project_root()
        if base is None:
            raise InputError(f"--on skypilot: the project's SkyPilot task ({TASK_FILE}) is not here: run the "
                             "sweep from a checkout of timellm-job (its code is what the VMs install)")
        if self.python is None:
            raise InputError("--on skypilot: SkyPilot's `sky` is not on PATH: install it in an environment of its "
                             "own (pipx install 'skypilot[gcp]'; its pins clash with ours)")
        for point in self.sweep.points:
            check(point)
        ask_skypilot(self.python, self.request("build", base, self.sweep.points))  # SkyPilot's loader, every task
        if not self.hf_token:
            log.warning(f"warning: sweep {self.sweep.name}: HF_TOKEN is not set: a job whose backbone is gated "
                        "(Llama-3) cannot download it on its VM")
        return base

    def _start(self, base: Path, point: Point) -> None:
        job = self._store(point)
        if job_summary(job, point.name)["phase"] == "completed":
            log.info(f"sweep {self.sweep.name}: job {point.name} is completed already: not launched")
            return
        holder = leases.live_holder(job)
        if holder is not None:
            log.info(f"sweep {self.sweep.name}: job {point.name} runs already (pid {holder.pid} on {holder.host}): "
                     "not launched")
            return
        mark(self.sweep, point)
        job.replace(LAUNCH_SPEC, spec_to_yaml(point.spec).encode(), private=True)
        (said,) = self.launch(self.request("launch", base, [point]))["jobs"]
        log.info(f"sweep {self.sweep.name}: job {point.name} launched on SkyPilot "
                 f"(managed job {', '.join(map(str, said.get('managed_job_ids') or [])) or '?'})")

    def _wait(self) -> None:
        """Until every job completed or failed (as storage says), or the sweep is stopped."""
        seen: dict[str, str] = {}
        while self.stopping is None:
            phases = {p.name: job_summary(self._store(p), p.name)["phase"] for p in self.sweep.points}
            for name, phase in phases.items():
                if seen.get(name) != phase:
                    log.info(f"sweep {self.sweep.name}: job {name}: {phase}")
            seen = phases
            if all(phase in FINAL for phase in phases.values()):
                return
            deadline = time.monotonic() + self.poll_s
            while self.stopping is None and time.monotonic() < deadline:
                time.sleep(0.2)

    def run(self) -> int:
        """Check, launch, watch; the sweep's exit code. Raises InputError (exit 2) before anything
        is written, SkyPilotError when a launch fails."""
        base = self.checked()
        before = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for point in self.sweep.points:
                if self.stopping is None:
                    self._start(base, point)
            self._wait()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        if self.stopping is not None:
            log.info(f"sweep {self.sweep.name}: detached; the managed jobs run on (`sky jobs queue`; "
                     "`sky jobs cancel -n <job>` stops one)")
        return summary(self.sweep, self.stopping)
