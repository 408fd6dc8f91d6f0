"""The lease: generations taken create-only, so two orchestrators never both hold a job, and a
writer whose generation was taken over is fenced: it commits and deletes nothing (local disk and
S3/moto; the GCS emulator ignores preconditions, so GCS is not tested here)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.clocks import HolderRenewsMeanwhile, ManualClock, NoWaiting, Renewer, SkewedClock
from timellm_job.storage import job_store
from timellm_job.storage import lease as leases


@pytest.fixture(params=["local", "s3"])
def job(request, tmp_path):
    if request.param == "local":
        return job_store(str(tmp_path), "job")
    from tests import servers

    server = request.getfixturevalue("s3_server")
    return job_store(f"s3://{servers.S3_BUCKET}/lease-{time.time_ns()}", "job", servers.s3_options(server))


def test_only_one_of_many_concurrent_takers_wins(job):
    """Six takers at once: the one that takes the generation holds it and renews it; every
    other one is told the job is held, at once or as soon as it sees the winner renew."""
    wins, held = [], []
    renewers = []

    def take():
        try:
            won = leases.acquire(job, ttl_s=1.5)
        except leases.LeaseHeld as exc:
            held.append(exc)
            return
        wins.append(won)
        renewers.append(Renewer(job, won, 1.5).__enter__())

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in renewers:
        r.__exit__()
    assert len(wins) == 1 and len(held) == 5
    assert "held by orchestrator pid" in str(held[0])


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(job):
    old = leases.acquire(job, ttl_s=0.2)
    new = leases.acquire(job, ttl_s=60)  # watched unchanged for the holder's TTL: taken
    assert new.owner != old.owner
    with pytest.raises(leases.LeaseLost):
        leases.renew(job, old, ttl_s=60)
    leases.renew(job, new, ttl_s=60)
    leases.release(job, old)  # not the holder: nothing happens
    assert leases.read(job).owner == new.owner
    leases.release(job, new)
    assert leases.read(job) is None


def test_lease_of_a_dead_pid_on_this_host_is_taken_at_once(job):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = leases.acquire(job, ttl_s=3600)
    dead.pid = proc.pid
    job.replace(f"lease/{dead.generation:010d}.json", dead.to_bytes())
    taken = leases.acquire(job, ttl_s=60)
    assert taken.owner != dead.owner and taken.generation == dead.generation + 1


def test_generations_only_grow_and_a_release_is_not_a_deletion(job):
    first = leases.acquire(job, ttl_s=60)
    leases.release(job, first)
    assert leases.read(job) is None and leases.live_holder(job) is None
    second = leases.acquire(job, ttl_s=60)
    assert (first.generation, second.generation) == (1, 2)
    for _ in range(5):  # old generations are pruned, the newest kept
        leases.release(job, second)
        second = leases.acquire(job, ttl_s=60)
    assert second.generation == 7
    assert leases.generations(job) == [5, 6, 7]


def test_a_live_lease_of_the_earlier_single_file_format_is_honoured(job):
    """An earlier version renews lease.json: while it does, the job is held; once the document
    stays the same for a TTL it is taken (generation 1)."""
    old = leases.Lease("old-version", "other-host", 1, time.time(), time.time() + 60)
    job.replace("lease.json", old.to_bytes())
    done = threading.Event()

    def renew_old():
        while not done.wait(0.3):
            old.expires_at = time.time() + 60
            job.replace("lease.json", old.to_bytes())

    renewer = threading.Thread(target=renew_old)
    renewer.start()
    try:
        with pytest.raises(leases.LeaseHeld, match="other-host"):
            leases.acquire(job, ttl_s=1.0)
    finally:
        done.set()
        renewer.join()
    assert leases.acquire(job, ttl_s=60, clock=ManualClock()).generation == 1


def _race(job, takers: int) -> list:
    """``takers`` threads released at once against a lease whose holder is gone; the leases
    they won (a taker that would have had to watch a live holder did not win)."""
    barrier = threading.Barrier(takers)
    wins, errors = [], []

    def take():
        barrier.wait()
        try:
            wins.append(leases.acquire(job, ttl_s=60, clock=NoWaiting()))
        except (leases.LeaseHeld, NoWaiting.Watched):
            pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return wins


def test_concurrent_takeovers_of_an_expired_lease_have_exactly_one_winner(job):
    """Issue 15: with delete-then-create two takers both won 5 times in 600; with generations
    taken create-only, exactly one wins every trial (1,000 trials locally, 100 on moto S3)."""
    trials = 1000 if job.is_local else 100
    held = leases.acquire(job, ttl_s=60)
    for trial in range(trials):
        held.released = True  # the holder is gone (a release: judged at once, no TTL to watch)
        job.replace(f"lease/{held.generation:010d}.json", held.to_bytes())
        wins = _race(job, 3)
        assert len(wins) == 1, f"trial {trial}: {len(wins)} winners"
        assert wins[0].generation == held.generation + 1
        held = wins[0]


def test_a_fenced_writer_commits_and_deletes_nothing_and_the_manifest_names_its_generation(job):
    from timellm_job.storage import commit_checkpoint, list_checkpoints
    from timellm_job.storage.retention import clean_up

    old = leases.acquire(job, ttl_s=0.2)
    fence = leases.Fence.of(job, old)
    first = commit_checkpoint(job, 1, "step", {"a.bin": b"x" * 10}, "h", fence=fence)
    assert first.lease_generation == old.generation
    new = leases.acquire(job, ttl_s=60)  # the old document stays unchanged for its 0.2 s: taken
    mine = commit_checkpoint(job, 2, "step", {"a.bin": b"y" * 10}, "h", fence=leases.Fence.of(job, new))
    with pytest.raises(leases.LeaseLost, match="fenced"):
        commit_checkpoint(job, 3, "step", {"a.bin": b"z" * 10}, "h", fence=fence)
    with pytest.raises(leases.LeaseLost):
        clean_up(job, 1, spec_hash="h", fence=fence)
    listing = list_checkpoints(job, spec_hash="h")
    assert [m.id for m in listing.committed] == [mine.id, first.id]  # nothing of step 3, nothing deleted
    assert job.exists(f"checkpoints/{first.id}/manifest.json")
    with pytest.raises(leases.LeaseLost):
        leases.renew(job, old, ttl_s=60)


def test_a_fenced_writers_late_commit_never_wins_over_the_holders(job):
    """A stale writer that committed a later step after the takeover is not the newest: the
    current holder's own checkpoints come first (lease generation, then progress)."""
    from timellm_job.storage import commit_checkpoint, list_checkpoints

    old = leases.acquire(job, ttl_s=0.2)
    new = leases.acquire(job, ttl_s=60)
    holder = commit_checkpoint(job, 10, "step", {"a.bin": b"n"}, "h", fence=leases.Fence.of(job, new))
    stale = commit_checkpoint(job, 20, "step", {"a.bin": b"o"}, "h", fence=None)  # fencing bypassed
    stale_fenced = commit_checkpoint(job, 30, "step", {"a.bin": b"p"}, "h")
    assert stale.lease_generation is None and stale_fenced.lease_generation is None
    assert list_checkpoints(job, spec_hash="h").committed[0].id == holder.id
    assert old.generation < new.generation


def test_two_runtimes_that_both_took_one_generation_on_a_store_without_create_only_writes(tmp_path):
    """Drive: two machines' mounts of one folder do not exclude each other, so both may write the
    same generation's document. The one whose document stands holds the lease; the other is
    fenced at its next check (renewal or commit). Built here with fsspec's ``dir::`` filesystem,
    which has no create-only write (the unsafe single-writer path)."""
    from timellm_job.storage import commit_checkpoint, job_store

    job = job_store("dir://shared", "job", {"path": str(tmp_path), "target_protocol": "file",
                                              "target_options": {"auto_mkdir": True}})
    assert not job.is_local
    first = leases.acquire(job, ttl_s=60)
    # the second runtime did not see the first's document (a lagging sync) and wrote the same one
    second = leases.Lease("runtime-b", "host-b", 2, time.time(), time.time() + 60, first.generation)
    job.replace(f"lease/{first.generation:010d}.json", second.to_bytes())
    with pytest.raises(leases.LeaseLost, match="fenced"):
        commit_checkpoint(job, 1, "step", {"a.bin": b"a"}, "h", fence=leases.Fence.of(job, first))
    with pytest.raises(leases.LeaseLost):
        leases.renew(job, first, ttl_s=60)
    ok = commit_checkpoint(job, 1, "step", {"a.bin": b"b"}, "h", fence=leases.Fence(job, second.generation, second.owner))
    assert ok.lease_generation == first.generation


def test_a_wiped_lease_folder_never_restarts_generations(job):
    """Issue 23, item 4: deleting lease/ (to clear what looked like a stale lock, or a job copied
    without it) made the next runtime take generation 1, below the job's generation-2
    checkpoints: a restart resumed from older work and retention deleted the newer. A new
    generation is above every generation recorded anywhere."""
    from timellm_job.storage import commit_checkpoint, list_checkpoints
    from timellm_job.storage.documents import write_json

    first = leases.acquire(job, ttl_s=60)
    leases.release(job, first)
    second = leases.acquire(job, ttl_s=60)
    done = commit_checkpoint(job, 40, "step", {"a.bin": b"x"}, "h", fence=leases.Fence.of(job, second))
    leases.release(job, second)
    job.remove("lease", recursive=True)
    third = leases.acquire(job, ttl_s=60)
    assert third.generation == 3
    newer = commit_checkpoint(job, 20, "step", {"a.bin": b"y"}, "h", fence=leases.Fence.of(job, third))
    assert [m.id for m in list_checkpoints(job).committed] == [newer.id, done.id]  # new work first
    leases.release(job, third)
    job.remove("lease", recursive=True)
    write_json(job, "state.json", {"name": "job", "lease": {"generation": 7}})  # recorded by a submit
    assert leases.acquire(job, ttl_s=60).generation == 8


@pytest.mark.parametrize("skew_s", [120.0, -120.0, 3600.0, -3600.0])
def test_a_live_holder_is_never_taken_over_whatever_either_clock_says(job, skew_s):
    """Issue 23, item 7: a runtime whose clock was 120 s ahead took a live job's lease and fenced
    the live runtime. Expiry is judged by watching the document on the taker's own monotonic
    clock: a holder that renews is live, whichever of the two clocks is off (the holder stamps
    its document with its clock, ``skew_s`` off the taker's, and renews while the taker waits)."""
    held = leases.acquire(job, ttl_s=60, clock=SkewedClock(skew_s))
    with pytest.raises(leases.LeaseHeld):
        leases.acquire(job, ttl_s=60, clock=HolderRenewsMeanwhile(job, held, 60, holder_offset_s=skew_s))
    observer = HolderRenewsMeanwhile(job, held, 60, holder_offset_s=skew_s)
    assert leases.live_holder(job, clock=observer, ttl_s=60).owner == held.owner
    leases.check(job, held.generation, held.owner)  # not fenced


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0])
def test_a_gone_holder_is_taken_over_after_one_unchanged_ttl_whatever_its_times_say(job, skew_s):
    """A holder whose clock was an hour ahead left a document that claims another hour of life;
    one whose clock was behind left one that looks long expired. Either way the taker watches it
    for one TTL of its own clock, then takes it."""
    gone = leases.acquire(job, ttl_s=30, clock=SkewedClock(skew_s))
    clock = ManualClock()
    taken = leases.acquire(job, ttl_s=30, clock=clock)
    assert taken.generation == gone.generation + 1
    assert 30 <= clock.slept <= 31  # a whole TTL watched, no longer
    assert leases.read(job).owner == taken.owner


def test_an_observer_ahead_of_the_holder_still_sees_it_live_and_a_gone_one_gone(job):
    """status and stop on a host whose clock is ahead: a document whose times say it expired is
    watched for one renewal interval before its holder is called gone (real time and a real
    renewing holder here: the renewal lands while the observer waits)."""
    held = leases.acquire(job, ttl_s=1.5)
    ahead = SkewedClock(120)
    with Renewer(job, held, 1.5):
        assert leases.live_holder(job, clock=ahead, ttl_s=1.5) is not None
    assert leases.live_holder(job, clock=ahead, ttl_s=1.5) is None  # no renewal while watched
