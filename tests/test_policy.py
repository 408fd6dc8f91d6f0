"""The supervisor's decisions, table-tested in milliseconds: every transition of the lifecycle
(jobs.status), from how an attempt ended (orchestrator.outcome.classify) to what follows
(orchestrator.policy.decide). The subprocess tests prove the wiring; these prove the rules."""

from __future__ import annotations

import signal

import pytest

from timellm_job.jobs import Phase
from timellm_job.jobs.protocol import ExitCode, Heartbeat
from timellm_job.jobs.spec import RunSpec
from timellm_job.jobs.status import Attempt
from timellm_job.orchestrator.outcome import ExitClass, Outcome, Stopping, classify, launcher_exit
from timellm_job.orchestrator.policy import End, History, Restart, backoff_s, crash_loop, decide

RUN = RunSpec(max_restarts=3, backoff_initial_s=0.5, backoff_max_s=4.0, crash_loop_limit=3)
TERM = Stopping(signal.SIGTERM, grace_period_s=30)


def ended(*steps_reasons, code: int | None = 1) -> list[Attempt]:
    return [Attempt(number=i + 1, started_at=0.0, ended_at=1.0, end_step=step, reason=reason, exit_code=code)
            for i, (step, reason) in enumerate(steps_reasons)]


def outcome(cls: ExitClass, code: int | None = 1, reason: str = "crashed (exit 1): boom", **kw) -> Outcome:
    return Outcome(cls, code, None, reason, **kw)


# ---------------------------------------------------------------------------- classify
@pytest.mark.parametrize("returncode, stopping, hung, tail, beat, cls, code, words", [
    (0, None, None, "", None, ExitClass.COMPLETED, 0, "completed"),
    (2, None, None, "x\nbad input: data.path: no such file\n", None, ExitClass.BAD_INPUT, 2, "data.path: no such file"),
    (4, None, None, "out of memory: the card holds 15 GiB\n", Heartbeat(oom={"smaller_plan": True}),
     ExitClass.OUT_OF_MEMORY, 4, "out of memory: the card holds 15 GiB"),
    (3, None, None, "", None, ExitClass.FENCED, 3, "fenced"),
    (1, None, None, "Traceback\nValueError: boom\n", None, ExitClass.CRASHED, 1, "ValueError: boom"),
    (1, None, None, "OSError: [Errno 28] No space left on device\n", None, ExitClass.CRASHED, 1, "the store is full"),
    (1, None, None, "RuntimeError: CUDA error: an illegal memory access\n", None, ExitClass.CRASHED, 1, "CUDA error"),
    (-9, None, None, "", None, ExitClass.KILLED, None, "an external kill"),
    (-11, None, None, "", None, ExitClass.KILLED, None, "segmentation fault"),
    (-9, None, 312.0, "", None, ExitClass.HUNG, -9, "no heartbeat for 312 s"),
    (143, TERM, None, "", Heartbeat(), ExitClass.PREEMPTED, 143, "the step it stopped at is committed"),
    (130, Stopping(signal.SIGINT), None, "", None, ExitClass.PREEMPTED, 130, "committed"),
    (143, TERM, None, "", Heartbeat(preempt_skipped="a write in flight did not finish within 24 s"),
     ExitClass.PREEMPTED, 143, "no preempt checkpoint: a write in flight did not finish within 24 s"),
    (143, None, None, "", None, ExitClass.KILLED, 143, "the trainer alone received SIGTERM"),
    (-9, TERM, None, "", None, ExitClass.PREEMPTED, None, "killed by SIGKILL while stopping"),
    (-9, Stopping(signal.SIGTERM, forced=True), None, "", None, ExitClass.PREEMPTED, None, "by a second signal"),
    (-9, Stopping(signal.SIGTERM, grace_over=True, grace_period_s=30), None, "", None, ExitClass.PREEMPTED, None,
     "killed after the grace period (30 s)"),
])
def test_classify(returncode, stopping, hung, tail, beat, cls, code, words):
    got = classify(returncode, stopping, hung, tail, beat)
    assert (got.exit_class, got.exit_code) == (cls, code) and words in got.reason, got


def test_classify_reads_the_heartbeat_not_the_log_for_a_skipped_preempt_checkpoint():
    said_only_in_the_log = "preempted by signal 15: no preempt checkpoint: slow store\n"
    assert classify(143, TERM, None, said_only_in_the_log, Heartbeat()).no_checkpoint is None
    got = classify(143, TERM, None, "", Heartbeat(preempt_skipped="slow store"))
    assert got.no_checkpoint == "no preempt checkpoint: slow store"


def test_a_kill_while_stopping_says_where_a_resume_starts():
    asked = []

    def newest():
        asked.append(1)
        return "; the newest checkpoint is 000000010-step (step 10)"

    got = classify(-9, TERM, None, "", None, newest=newest)
    assert got.no_checkpoint == got.reason and got.reason.endswith("(step 10)")
    assert classify(143, TERM, None, "", Heartbeat(), newest=newest).no_checkpoint is None
    assert classify(-9, None, None, "", None, newest=newest).exit_class is ExitClass.KILLED
    assert len(asked) == 1  # the store is listed only for the stop that lost its step


def test_host_oom_evidence_names_the_kernels_killer():
    got = classify(-9, None, None, "", None, host_oom="oom-kill: task=python pid=7")
    assert got.exit_class is ExitClass.KILLED and "out-of-memory killer" in got.reason and "pid=7" in got.reason


@pytest.mark.parametrize("returncode, tail, beat, code, rank", [
    (1, "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 4 (pid: 9)\n",
     None, 4, "rank 1: "),
    (1, "", Heartbeat(exit_code=2), 2, ""),  # rank 0's own code, from its heartbeat
    (0, "", Heartbeat(exit_code=2), 0, ""),
    (-9, "", Heartbeat(exit_code=2), -9, ""),  # torchrun itself was killed
])
def test_launcher_exit(returncode, tail, beat, code, rank):
    assert launcher_exit(returncode, tail, beat) == (code, rank)


def test_under_torchrun_the_failed_ranks_code_decides_and_is_named():
    tail = "Root Cause (first observed failure):\n  rank      : 1\n  exitcode  : 2\nbad input: data.path\n"
    got = classify(1, None, None, tail, None, launcher=True)
    assert got.exit_class is ExitClass.BAD_INPUT and got.reason.startswith("rank 1: bad input")


# ---------------------------------------------------------------------------- decide
ONE = History(ended((10, "crashed (exit 1): boom")))


@pytest.mark.parametrize("name, out, history, stopping, want", [
    ("completed", outcome(ExitClass.COMPLETED, 0, "completed"), ONE, None, End(Phase.COMPLETED, None, ExitCode.OK)),
    ("completed while stopping", outcome(ExitClass.COMPLETED, 0, "completed"), ONE, TERM,
     End(Phase.COMPLETED, None, ExitCode.OK)),
    ("bad input", outcome(ExitClass.BAD_INPUT, 2, "bad input: x"), ONE, None,
     End(Phase.FAILED, "bad input: x", ExitCode.BAD_INPUT)),
    ("oom, no smaller plan", outcome(ExitClass.OUT_OF_MEMORY, 4, "out of memory: y"), ONE, None,
     End(Phase.FAILED, "out of memory: y", ExitCode.FAILED)),
    ("oom, a smaller plan (auto)", outcome(ExitClass.OUT_OF_MEMORY, 4, "out of memory: y", smaller_plan=True), ONE,
     None, Restart(0.5, "out of memory: y", 0)),
    ("killed", outcome(ExitClass.KILLED, None, "killed by SIGKILL"), ONE, None, Restart(0.5, "killed by SIGKILL", 0)),
    ("crashed", outcome(ExitClass.CRASHED), ONE, None, Restart(0.5, "crashed (exit 1): boom", 0)),
    ("hung", outcome(ExitClass.HUNG, -9, "hung: no heartbeat for 300 s; killed"), ONE, None,
     Restart(0.5, "hung: no heartbeat for 300 s; killed", 0)),
    ("fenced, our lease still ours", outcome(ExitClass.FENCED, 3, "fenced: x"), ONE, None, Restart(0.5, "fenced: x", 0)),
    ("preempted, committed", outcome(ExitClass.PREEMPTED, 143, "preempted: committed"), ONE, TERM,
     End(Phase.PREEMPTED, "stopped by SIGTERM", ExitCode.SIGTERM)),
    ("preempted by SIGINT", outcome(ExitClass.PREEMPTED, 130, "preempted: committed"), ONE,
     Stopping(signal.SIGINT), End(Phase.PREEMPTED, "stopped by SIGINT", ExitCode.SIGINT)),
    ("preempted, no checkpoint", outcome(ExitClass.PREEMPTED, 143, "preempted: no preempt checkpoint: slow",
                                         no_checkpoint="no preempt checkpoint: slow"), ONE, TERM,
     End(Phase.PREEMPTED, "stopped by SIGTERM; no preempt checkpoint: slow", ExitCode.SIGTERM)),
    ("a crash while a stop request is under way", outcome(ExitClass.CRASHED), ONE, TERM,
     End(Phase.PREEMPTED, "stopped by SIGTERM", ExitCode.SIGTERM)),
    ("crash loop", outcome(ExitClass.CRASHED),
     History(ended(*[(10, "crashed (exit 1): boom")] * 3), restarts_here=2), None,
     End(Phase.FAILED, "crash loop: crashed (exit 1): boom, 3 times at step 10 with no progress", ExitCode.FAILED)),
    ("budget spent", outcome(ExitClass.CRASHED), History(ended((1, "a"), (2, "b"), (3, "c"), (4, "crashed")),
                                                         restarts_here=3), None,
     End(Phase.FAILED, "restart budget spent (3) in this submit; last: crashed (exit 1): boom", ExitCode.FAILED)),
    ("no progress: the backoff doubles", outcome(ExitClass.CRASHED),
     History(ended((10, "a"), (10, "b")), restarts_here=1, restarts_in_a_row=1), None,
     Restart(2.0, "crashed (exit 1): boom", 2)),
    ("progress: the backoff starts over", outcome(ExitClass.CRASHED),
     History(ended((10, "a"), (20, "b")), restarts_here=2, restarts_in_a_row=2), None,
     Restart(0.5, "crashed (exit 1): boom", 0)),
])
def test_decide(name, out, history, stopping, want):
    assert decide(out, history, RUN, stopping) == want, name


def test_the_backoff_is_capped():
    assert [backoff_s(RUN, n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("attempts, loop", [
    (ended((5, "x"), (5, "x"), (5, "x")), True),
    (ended((5, "x"), (5, "x")), False),  # fewer than the limit
    (ended((5, "x"), (6, "x"), (5, "x")), False),  # it moved
    (ended((5, "x"), (5, "y"), (5, "x")), False),  # different reasons
    (ended((5, "x"), (5, "x"), (5, "x"), code=0), False),  # a completed attempt is no crash
])
def test_crash_loop(attempts, loop):
    assert crash_loop(attempts, 3) is loop


def test_every_exit_code_says_what_the_supervisor_does():
    from timellm_job.jobs.protocol import ON_EXIT

    assert set(ON_EXIT) == set(ExitCode) and all(ON_EXIT.values())
