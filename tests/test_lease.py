"""The lease: create-only, so two orchestrators never both hold a job (local disk and S3/moto;
the GCS emulator ignores preconditions, so GCS is not tested here)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from storage import job_store
from storage import lease as leases


@pytest.fixture(params=["local", "s3"])
def job(request, tmp_path):
    if request.param == "local":
        return job_store(str(tmp_path), "job")
    import servers

    server = request.getfixturevalue("s3_server")
    return job_store(f"s3://{servers.S3_BUCKET}/lease-{time.time_ns()}", "job", servers.s3_options(server))


def test_only_one_of_many_concurrent_takers_wins(job):
    wins, held = [], []

    def take():
        try:
            wins.append(leases.acquire(job, ttl_s=60))
        except leases.LeaseHeld as exc:
            held.append(exc)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(held) == 5
    assert "held by orchestrator pid" in str(held[0])


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(job):
    old = leases.acquire(job, ttl_s=0.2)
    time.sleep(0.3)
    new = leases.acquire(job, ttl_s=60)
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
    job.replace("lease.json", dead.to_bytes())
    taken = leases.acquire(job, ttl_s=60)
    assert taken.owner != dead.owner
