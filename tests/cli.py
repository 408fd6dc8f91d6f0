"""Running ``timellm-job`` as users do: real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from timellm_job.jobs.protocol import TRAINER_MODULE

REPO = Path(__file__).resolve().parents[1]
# How long a wait on a trainer's progress may take before it fails. A wait returns as soon as the
# progress is seen, so this costs nothing when the trainer runs; it is generous because a trainer
# starting (two ranks under torchrun, say) while another test trains on the same 2 cores was seen
# taking over 120 s to its third step in CI.
PATIENCE_S = 300

# slow steps and checkpoint writes (tests/faults), so that kills and signals land mid-run
SLOW = {"TIMELLM_JOB_TEST_STEP_DELAY_S": "0.08", "TIMELLM_JOB_TEST_WRITE_DELAY_S": "0.03"}


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TIMELLM_JOB_WORKDIR": str(tmp / "work"), "TIMELLM_JOB_LEASE_TTL_S": "6",
            "TIMELLM_JOB_BACKBONE_CACHE": str(tmp / "backbones"),
            "PYTHONUNBUFFERED": "1", **extra}


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "timellm_job.orchestrator.cli", *args]


def run(tmp: Path, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv(*args), cwd=REPO, env=env_for(tmp, **extra), capture_output=True, text=True,
                          timeout=timeout)


def start(tmp: Path, *args: str, **extra: str) -> subprocess.Popen:
    """``submit`` in its own session, like a notebook cell or a VM's startup script."""
    return subprocess.Popen(argv(*args), cwd=REPO, env=env_for(tmp, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def state(job: Path) -> dict:
    try:
        return json.loads((job / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_until(ready, what: str, timeout: float = PATIENCE_S, poll: float = 0.1, alive=()):
    """Poll ``ready()`` until it returns something truthy, and return that. Fails (AssertionError
    naming ``what``) after ``timeout`` seconds, or at once when a process in ``alive`` (a Popen)
    has ended: a wait on a job whose ``submit`` is gone would otherwise spend its whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        for proc in alive:
            if proc.poll() is not None:
                out = proc.communicate()[0] if proc.stdout else ""
                raise AssertionError(f"{what}: a process ended first (exit {proc.returncode}): {out}")
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}"
        time.sleep(poll)


def running_trainer(job: Path, after: int = 0, timeout: float = PATIENCE_S, submit=None) -> dict | None:
    """The running attempt (number > after) once its trainer is alive; None if ``submit`` ended."""
    def running():
        if submit is not None and submit.poll() is not None:
            return {"ended": True}
        attempts = state(job).get("attempts") or []
        if attempts and attempts[-1]["number"] > after and attempts[-1].get("ended_at") is None \
                and psutil.pid_exists(attempts[-1]["pid"]):
            return attempts[-1]
        return None

    found = wait_until(running, f"a running trainer (attempt > {after}) in {job}", timeout)
    return None if found.get("ended") else found


def heartbeats(work: Path, attempt: int) -> list[dict]:
    """The heartbeats of ``attempt`` (their own files, fresher than state.json) of each job whose
    work folder is under ``work`` (``TIMELLM_JOB_WORKDIR``); one being replaced is left out."""
    docs = []
    for path in work.glob(f"*/heartbeat-{attempt:03d}.json"):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return docs


def heartbeat(work: Path, attempt: int) -> dict:
    """The heartbeat of ``attempt`` of the one job under ``work``; {} before there is one."""
    return next(iter(heartbeats(work, attempt)), {})


def _wait_for_heartbeat(tmp: Path, attempt: int, reached, timeout: float, what: str) -> None:
    """Wait until the heartbeat of ``attempt`` satisfies ``reached``, once the trainer has
    resumed (its ``start_step`` is known)."""
    def seen() -> bool:
        return any("start_step" in doc and reached(doc) for doc in heartbeats(tmp / "work", attempt))

    wait_until(seen, f"attempt {attempt} {what}", timeout, poll=0.05)


def wait_for_progress(tmp: Path, attempt: int, steps: int, timeout: float = PATIENCE_S) -> None:
    """Wait until the trainer of ``attempt`` has taken ``steps`` steps past where it started."""
    _wait_for_heartbeat(tmp, attempt, lambda d: d.get("step", 0) >= d["start_step"] + steps, timeout,
                        "made no progress")


def wait_for_new_ground(tmp: Path, job: Path, attempt: int, steps: int = 2, timeout: float = PATIENCE_S) -> None:
    """Wait until the trainer of ``attempt`` has taken ``steps`` steps past where it started and
    stands past the step where the attempt before it ended: a kill then never lands at the step
    of the previous one (three kills at one step are, rightly, a crash loop)."""
    previous = [a for a in state(job).get("attempts") or [] if a["number"] == attempt - 1]
    beyond = (previous[0].get("end_step") or 0) if previous else 0
    _wait_for_heartbeat(tmp, attempt, lambda d: d.get("step", 0) >= max(d["start_step"] + steps, beyond + 1),
                        timeout, f"made no progress past step {beyond}")


def wait_for_checkpoint(job: Path, kind: str, submit: subprocess.Popen, timeout: float = PATIENCE_S) -> None:
    """Wait until a checkpoint of ``kind`` is committed in ``job`` while ``submit`` runs."""
    wait_until(lambda: list((job / "checkpoints").glob(f"*-{kind}/manifest.json")),
               f"a committed {kind} checkpoint in {job}", timeout, alive=[submit])


def wait_for_step(job: Path, step: int, timeout: float = PATIENCE_S) -> None:
    wait_until(lambda: ((state(job).get("heartbeat") or {}).get("step") or 0) >= step,
               f"step {step} in {job}", timeout)


def is_trainer(cmd: list[str]) -> bool:
    """Whether a command line is a trainer's (``python [-u] -m timellm_job.trainer run ...``), or
    a warm spare's (``... spare ...``: once claimed it is its attempt's trainer; the heartbeat's
    pid tells which)."""
    at = cmd.index("-m") if "-m" in cmd else -1
    return at >= 0 and cmd[at + 1:at + 3] in ([TRAINER_MODULE, "run"], [TRAINER_MODULE, "spare"])


def submit_of(spec: str) -> psutil.Process | None:
    """The running ``submit`` whose spec path ends with ``spec`` (a sweep's job: its spec lies in
    the sweep's work folder, on whatever node runs it)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "submit" in cmd and cmd[-1].endswith(spec):
            return p
    return None


def spares_of(submit: subprocess.Popen, but: set[int]) -> list[psutil.Process]:
    """The warm spares ``submit`` has started (orchestrator.spare), but those in ``but`` (its
    trainer: a claimed spare keeps its command line)."""
    try:
        children = psutil.Process(submit.pid).children()
    except psutil.Error:
        return []
    out = []
    for p in children:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if p.pid not in but and cmd[1:4] == ["-m", TRAINER_MODULE, "spare"]:
            out.append(p)
    return out


def resume_after_preemption(tmp: Path, spec: Path, job: Path) -> dict:
    """After ``submit`` exited 143: the step the attempt reached is committed, verified, exactly
    once: a preempt checkpoint, or (when SIGTERM came at a step that was being saved anyway) that
    step's own checkpoint and no preempt one; a new ``submit`` resumes from it and completes.
    Returns the state."""
    doc = state(job)
    assert doc["phase"] == "preempted", doc
    status = json.loads(run(tmp, "status", str(spec), "--json", "--verify").stdout)
    end = doc["attempts"][-1]["end_step"]
    at_end = [c for c in status["checkpoints"] if c["step"] == end and c["kind"] in ("preempt", "step")]
    preempts = [c for c in status["checkpoints"] if c["kind"] == "preempt"]
    assert len(at_end) == 1 and at_end[0]["valid"] is True, status["checkpoints"]
    assert len(preempts) == (1 if at_end[0]["kind"] == "preempt" else 0), preempts
    result = run(tmp, "submit", str(spec))
    assert result.returncode == 0, result.stderr
    doc = state(job)
    assert doc["attempts"][-1]["resumed_from"]["id"] == at_end[0]["id"]
    return doc
