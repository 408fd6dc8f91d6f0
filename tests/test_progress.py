"""What the terminal running ``submit`` shows: a live bar on a TTY, plain lines elsewhere; both
name the phase, the step out of the total and the loss."""

from __future__ import annotations

import os
import pty
import re
import subprocess

import pytest

from tests.cli import REPO, argv, env_for, run
from tests.jobfiles import quick_spec

pytestmark = pytest.mark.slow


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    spec = quick_spec(tmp_path, train={"epochs": 1})
    # steps slowed to 0.15 s and evaluation batches to 2 s: each phase lasts longer than the
    # orchestrator's 1 s look at the heartbeat, whatever the machine
    result = run(tmp_path, "submit", str(spec), TIMELLM_JOB_PROGRESS_EVERY_S="0.5", TIMELLM_JOB_TEST_STEP_DELAY_S="0.15",
                 TIMELLM_JOB_TEST_EVAL_DELAY_S="2")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # no carriage returns in a log
    training = re.findall(r"\] training (\d+)/26 epoch 0 loss \d+\.\d{4} lr \S+ [\d.]+ steps/s ETA \d\d:\d\d:\d\d",
                          result.stderr)
    assert training and int(training[-1]) > int(training[0])
    assert "] validating" in result.stderr and "] testing" in result.stderr
    assert "Loading weights" not in (tmp_path / "work").joinpath(next(os.walk(tmp_path / "work"))[1][0],
                                                                   "attempt-001.log").read_text()


def test_a_live_bar_on_a_terminal(tmp_path):
    spec = quick_spec(tmp_path, train={"epochs": 1})
    main, sub = pty.openpty()
    proc = subprocess.Popen(argv("submit", str(spec)), cwd=REPO,
                            env={**env_for(tmp_path), "COLUMNS": "160", "TIMELLM_JOB_TEST_STEP_DELAY_S": "0.15"},
                            stdout=sub, stderr=sub, stdin=subprocess.DEVNULL)
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: submit ended
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(main)
    assert proc.returncode == 0
    text = out.decode(errors="replace")
    assert "\x1b[" in text  # drawn with terminal control sequences, redrawn in place
    assert re.search(r"training.*\d+/26.*loss \d+\.\d{4}", text) and re.search(r"lease\s+generation\s+1\s+taken", text)
