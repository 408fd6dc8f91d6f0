"""Goodput: where a job's wall time went (start-up, training that counted, steps retrained after
a loss, validation/test, idle), for the job and each attempt; the parts add up to the wall time."""

from __future__ import annotations

import math

from timellm_job.jobs import Attempt, JobStatus
from timellm_job.jobs.status import attempt_goodput, goodput


def _sum(g: dict) -> float:
    return sum(g["parts"].values())


def test_an_attempt_splits_into_startup_training_retrained_eval_and_idle():
    a = Attempt(number=2, started_at=100.0, ended_at=200.0, start_step=40, end_step=60, first_step_at=110.0,
                training_s=70.0, eval_s=15.0)
    g = attempt_goodput(a, done_before=50, now=1e9)  # an earlier attempt reached step 50: 10 of 20 steps again
    assert g["parts"] == {"startup_s": 10.0, "training_s": 35.0, "retrained_s": 35.0, "eval_s": 15.0, "idle_s": 5.0}
    assert g["wall_s"] == 100.0 and g["useful_s"] == 35.0 and g["share"] == 0.35


def test_an_attempt_that_never_reached_a_step_is_all_startup_and_a_running_one_ends_now():
    never = Attempt(number=1, started_at=0.0, ended_at=30.0)
    assert attempt_goodput(never, 0, now=1e9)["parts"]["startup_s"] == 30.0
    running = Attempt(number=1, started_at=0.0, start_step=0, end_step=5, first_step_at=4.0, training_s=6.0)
    g = attempt_goodput(running, 0, now=12.0)
    assert g["wall_s"] == 12.0 and g["parts"]["training_s"] == 6.0 and g["parts"]["idle_s"] == 2.0


def test_the_job_counts_the_time_between_runtimes_as_idle_and_its_parts_add_up():
    s = JobStatus(name="j", attempts=[
        Attempt(number=1, started_at=0.0, ended_at=100.0, start_step=0, end_step=50, first_step_at=20.0,
                training_s=70.0, eval_s=5.0),
        # a runtime gone for 300 s; the next resumes at step 45 (five steps are trained again)
        Attempt(number=2, started_at=400.0, ended_at=500.0, start_step=45, end_step=95, first_step_at=410.0,
                training_s=80.0, eval_s=10.0)])
    goodput(s, now=1e9)
    g = s.goodput
    assert g["wall_s"] == 500.0 and math.isclose(_sum(g), g["wall_s"], rel_tol=0.02)
    assert g["parts"]["retrained_s"] == 8.0  # 5 of attempt 2's 50 steps, 80 s of training
    assert g["parts"]["idle_s"] == 500.0 - 30.0 - 142.0 - 8.0 - 15.0
    assert g["share"] == round(142.0 / 500.0, 4)
    for a in s.attempts:
        assert math.isclose(_sum(a.goodput), a.goodput["wall_s"], rel_tol=0.02)


def test_the_loss_plot_shades_the_work_each_loss_cost(tmp_path):
    from timellm_job.orchestrator.plot import plot_losses

    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 101)] + [{"step": 50, "val_loss": 0.5}]
    attempts = [{"number": 1, "start_step": 0, "end_step": 57, "reason": "killed by SIGKILL"},
                {"number": 2, "start_step": 50, "end_step": 80, "reason": "preempted: the step it stopped at is committed"},
                {"number": 3, "start_step": 80, "end_step": 100, "reason": "completed"}]
    out = tmp_path / "loss.png"
    marked = plot_losses(records, attempts, str(out), "job")
    assert marked["lost"] == [(50, 57)]  # the preemption lost nothing
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stale_state_shows_no_eta_and_says_it_is_not_current():
    """Issue 23, item 15: on a full disk the orchestrator cannot write state.json, and status
    went on showing the ETA of the last document it could write."""
    import io
    import time

    from rich.console import Console

    from timellm_job.orchestrator.status_view import STALE_S, render

    def shown(updated_at: float) -> str:
        doc = {"name": "job", "phase": "running", "global_step": 10, "total_steps": 100, "epoch": 0,
               "heartbeat": {"steps_per_s": 2.0, "phase": "training"}, "updated_at": updated_at,
               "attempts": [{"number": 1, "started_at": time.time() - 60, "ended_at": None, "pid": 1}],
               "checkpoints": [], "restarts": 0}
        out = io.StringIO()
        render(doc, Console(file=out, width=200))
        return out.getvalue()

    fresh, stale = shown(time.time()), shown(time.time() - STALE_S - 30)
    assert "ETA 00:00:45" in fresh and "not current" not in fresh
    assert "ETA -" in stale and "state.json last written" in stale and "not current" in stale
