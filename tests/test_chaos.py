"""The CI-sized chaos run (benchmarks/chaos.py has the engine and the long version): on the GCS
emulator behind a proxy that fails a share of requests (503s and dropped connections), 8 SIGKILLs
of the trainer (some inside a checkpoint write, which is slowed for that), 2 kills of the whole
process group with a resubmit, a SIGTERM, a SIGSTOP hang, a flipped byte in the newest
checkpoint, a second submit while the job's runtime is alive and a runtime whose storage path
stalls until its lease expires; a warm spare waits behind every attempt, and restarts claim
them. The job must end bit-identical to an uninterrupted run, no attempt may resume from the
corrupted checkpoint's bytes (its id may hold a new, whole checkpoint once it was set apart and
committed again), the second submit exits 3 writing nothing, and the stalled runtime, once its
path flows again, is fenced and exits 3."""

from __future__ import annotations

import random

import pytest

from benchmarks import chaos

pytestmark = [pytest.mark.slow, pytest.mark.long]  # about 2.5 minutes on 2 cores
EPOCHS = 4


def test_chaos_ends_bit_identical_and_never_loads_a_corrupted_checkpoint(tmp_path):
    plan = ["kill"] * 8 + ["group"] * 2 + ["sigterm", "sigstop", "corrupt", "second", "stall"]
    random.Random(5).shuffle(plan)
    (tmp_path / "ref").mkdir()
    expected = chaos.reference(tmp_path / "ref", EPOCHS)
    run = chaos.Chaos(tmp_path, EPOCHS, seed=5, fault_every=40)  # each fault retried costs 1-2 s of backoff
    try:
        run.run(plan)
        got = chaos.final_state(run.store)
        summary = run.summary()
    finally:
        run.stop()
    print(summary)  # shown with a failure
    assert run.submit.returncode == 0 and summary["phase"] == "completed", summary
    assert summary["events"] == {"kill": 8, "group": 2, "sigterm": 1, "sigstop": 1, "corrupt": 1,
                                 "second": 1, "stall": 1}, summary
    assert summary["kills_in_a_write"] >= 1, summary
    assert summary["faults_injected"] >= 20, summary
    assert summary["sigterm_exits"] == [143], summary
    # a warm spare waits behind every attempt: besides each submit's first, restarts claimed them
    assert summary["warm_attempts"] > summary["submits"], summary
    assert summary["steps_lost"]["sigterm"] == [0], summary  # a preempt checkpoint of the step reached
    # a kill loses what the newest committed checkpoint does not hold: at most the steps since
    # the previous save plus those trained while the newest one was still being written; one save
    # more when the checkpoint before that is the corrupted one (skipped, and never rewritten)
    assert all(0 <= n <= 2 * chaos.SAVE_STEPS for n in summary["kills_not_past_a_corrupted_checkpoint"]), summary
    assert all(0 <= n <= 3 * chaos.SAVE_STEPS for n in summary["kills_past_a_corrupted_checkpoint"]), summary
    assert len(summary["corrupted"]) == 1 and summary["skipped_corrupted"] >= 1, summary
    assert summary["resumed_from_corrupted"] == [], summary
    assert summary["second_submits"] == {"exits": [3], "said_held": 1, "lease_untouched": 1, "first_alive": 1}, summary
    stalled = summary["stalled_runtimes"]
    assert stalled["exits"] == [3] and stalled["resumed_from_late"] == [], summary
    assert all(new == old + 1 for old, new in stalled["generations"]), summary
    assert got == expected
