"""The job's lease: at most one live orchestrator per job.

Invariants:
- Taken with create-only semantics (O_EXCL locally, ifGenerationMatch=0 on GCS, If-None-Match
  on S3), so of two orchestrators racing for a free lease exactly one wins.
- A lease names owner (a random token), host, pid and expiry. The holder renews it well before
  expiry; a holder that dies stops renewing and the lease expires ``ttl_s`` later.
- A lease is taken over only when expired, or when its holder is on this host and its pid is
  dead. Takeover re-reads the lease and deletes it only if unchanged, then creates it
  create-only: a takeover can still lose the race, never win it twice.
- Renewing checks the owner first: a holder whose lease was taken over learns it
  (:class:`LeaseLost`) instead of overwriting the new holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from storage.layout import LEASE
from storage.store import Store


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        doc = json.loads(data)
        return cls(**{k: doc[k] for k in ("owner", "host", "pid", "acquired_at", "expires_at")})

    def holder_is_dead(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.expires_at <= now:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


class LeaseHeld(RuntimeError):
    def __init__(self, holder: Lease):
        self.holder = holder
        left = max(0.0, holder.expires_at - time.time())
        super().__init__(f"the job is held by orchestrator pid {holder.pid} on {holder.host} "
                         f"(lease expires in {left:.0f} s, at {time.strftime('%H:%M:%S', time.localtime(holder.expires_at))}"
                         f"); wait for it, or stop that process")


class LeaseLost(RuntimeError):
    """Another orchestrator took the lease over; this one must stop at once."""


def _pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read(job: Store) -> Lease | None:
    try:
        return Lease.from_bytes(job.read_bytes(LEASE))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return Lease("unreadable", "?", -1, 0.0, 0.0)  # a torn lease is an expired one


def live_holder(job: Store) -> Lease | None:
    """The lease's holder, while it lives (not expired, not a dead pid on this host)."""
    holder = read(job)
    return holder if holder is not None and not holder.holder_is_dead() else None


def acquire(job: Store, ttl_s: float) -> Lease:
    """Take the lease or raise LeaseHeld naming the live holder."""
    for _ in range(3):
        now = time.time()
        mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now + ttl_s)
        try:
            job.create(LEASE, mine.to_bytes())
            return mine
        except FileExistsError:
            pass
        holder = read(job)
        if holder is None:
            continue
        if not holder.holder_is_dead():
            raise LeaseHeld(holder)
        again = read(job)
        if again is not None and again.owner == holder.owner:
            job.remove(LEASE)
    holder = read(job)
    raise LeaseHeld(holder or Lease("?", "?", -1, 0.0, 0.0))


def renew(job: Store, lease: Lease, ttl_s: float) -> Lease:
    current = read(job)
    if current is None or current.owner != lease.owner:
        raise LeaseLost(f"the job's lease now belongs to pid {current.pid if current else '?'} "
                        f"on {current.host if current else '?'}")
    lease.expires_at = time.time() + ttl_s
    job.replace(LEASE, lease.to_bytes())
    return lease


def release(job: Store, lease: Lease) -> None:
    current = read(job)
    if current is not None and current.owner == lease.owner:
        job.remove(LEASE)
