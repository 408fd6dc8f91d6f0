"""The job's lease: at most one live orchestrator per job, and a generation number that fences
out every writer that lost it.

Invariants:
- The lease is a sequence of generation documents ``lease/<generation>.json``; the highest is
  the lease. A generation is only ever taken by a create-only write (O_EXCL/link locally,
  ifGenerationMatch=0 on GCS, If-None-Match on S3): of any number of takers racing for the
  next generation exactly one wins, and nothing is deleted before it is taken. Generations only
  grow (a released lease is marked released, never removed).
- A lease document names owner (a random token), host, pid, expiry and its generation. Its
  holder renews it (rewrites its own document) well before expiry; a holder that dies stops
  renewing and the lease expires ``ttl_s`` later.
- A lease is taken over only when expired, released, or held by a dead pid on this host.
- Fencing: a holder is *fenced* as soon as a higher generation exists. ``renew`` and
  :class:`Fence` check it; every writer checks its fence right before each commit and stops at
  once (:class:`LeaseLost`) when fenced, leaving the newer holder's objects untouched.
- Every lease call's retries are bounded by a sixth of the TTL (fence checks: 10 s), well under
  the renewal interval (a third of the TTL): a stalled store fails a renewal before the lease
  lapses; the supervisor renews again at its next tick.
- A ``lease.json`` of an earlier version of timellm-job is honoured while it lives (never
  written).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from storage.layout import LEASE, LEASES
from storage.store import Store

_GENERATION = re.compile(r"^(\d{10})\.json$")
KEEP_GENERATIONS = 3  # the newest documents kept as history; older ones are removed by the holder
CHECK_RETRY_S = 10.0  # a fence check's retries in all (well under the default renewal interval, 20 s)


def _bounded(job: Store, ttl_s: float | None = None) -> Store:
    """The lease's calls retry for at most a sixth of the TTL (half a renewal interval), so a
    stalled store makes a renewal fail while the lease still holds, never after it lapsed."""
    return job.bounded(CHECK_RETRY_S if ttl_s is None else max(0.5, ttl_s / 6))


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    generation: int = 0
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        doc = json.loads(data)
        return cls(**{k: doc[k] for k in ("owner", "host", "pid", "acquired_at", "expires_at")},
                   generation=int(doc.get("generation", 0)), released=bool(doc.get("released", False)))

    def holder_is_dead(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.released or self.expires_at <= now:
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
    """A newer generation of the lease exists: this writer is fenced and must stop writing."""


def _pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _path(generation: int) -> str:
    return f"{LEASES}/{generation:010d}.json"


def generations(job: Store) -> list[int]:
    """The lease generations taken so far (those still kept), oldest first."""
    return sorted(int(m.group(1)) for name, _, _ in job.list_dir(LEASES) if (m := _GENERATION.match(name)))


def newest_generation(job: Store) -> int:
    gens = generations(job)
    return gens[-1] if gens else 0


def _parse(data: bytes, generation: int = 0) -> Lease:
    try:
        return Lease.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        return Lease("unreadable", "?", -1, 0.0, 0.0, generation)  # a torn lease is an expired one


def _read_generation(job: Store, generation: int) -> Lease | None:
    try:
        return _parse(job.read_bytes(_path(generation)), generation)
    except FileNotFoundError:
        return None


def _legacy(job: Store) -> Lease | None:
    try:
        return _parse(job.read_bytes(LEASE))
    except FileNotFoundError:
        return None


def read(job: Store) -> Lease | None:
    """The lease as it stands (the highest generation), or None if none was taken or it was
    released."""
    for _ in range(3):
        top = newest_generation(job)
        current = _read_generation(job, top) if top else _legacy(job)
        if current is None and top:
            continue  # pruned between the listing and the read: list again
        return None if current is None or current.released else current
    return None


def live_holder(job: Store) -> Lease | None:
    """The lease's holder, while it lives (not expired, not released, not a dead pid on this host)."""
    holder = read(job)
    return holder if holder is not None and not holder.holder_is_dead() else None


def acquire(job: Store, ttl_s: float) -> Lease:
    """Take the next generation of the lease, or raise LeaseHeld naming the live holder."""
    job = _bounded(job, ttl_s)
    for _ in range(5):
        top = newest_generation(job)
        holder = _read_generation(job, top) if top else _legacy(job)
        if top and holder is None:
            continue
        if holder is not None and not holder.holder_is_dead():
            raise LeaseHeld(holder)
        now = time.time()
        mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now + ttl_s, top + 1)
        try:
            job.create(_path(mine.generation), mine.to_bytes())  # the conditional takeover
        except FileExistsError:
            continue  # another taker won this generation: judge its lease
        for old in generations(job)[:-KEEP_GENERATIONS]:
            if old < mine.generation:
                job.remove(_path(old))
        return mine
    raise LeaseHeld(read(job) or Lease("?", "?", -1, 0.0, 0.0))


def check(job: Store, generation: int, owner: str | None = None) -> None:
    """Raise LeaseLost if this writer is fenced: a generation newer than ``generation`` exists,
    or (``owner`` given) its own generation's document names another owner, which only a store
    without create-only writes allows (two runtimes writing one Drive folder: the last writer of
    the document holds it)."""
    job = _bounded(job)
    top = newest_generation(job)
    holder = _read_generation(job, top) if top else None
    if top > generation or (owner is not None and top == generation and holder is not None
                            and holder.owner != owner):
        who = f"pid {holder.pid} on {holder.host}" if holder else "another orchestrator"
        raise LeaseLost(f"fenced: the job's lease was taken over by {who} (generation {top}; "
                        f"this writer holds generation {generation})")


def renew(job: Store, lease: Lease, ttl_s: float) -> Lease:
    """Extend the lease; LeaseLost if it was taken over (checked before and after the write:
    a takeover landing between them is seen at the next check, before any commit)."""
    job = _bounded(job, ttl_s)
    check(job, lease.generation, lease.owner)
    lease.expires_at = time.time() + ttl_s
    job.replace(_path(lease.generation), lease.to_bytes())
    check(job, lease.generation, lease.owner)
    return lease


def release(job: Store, lease: Lease) -> None:
    """Mark the lease released (its generation stays taken, so generations only grow)."""
    if newest_generation(job) != lease.generation:
        return
    current = _read_generation(job, lease.generation)
    if current is not None and current.owner == lease.owner:
        lease.released = True
        lease.expires_at = time.time()
        job.replace(_path(lease.generation), lease.to_bytes())


class Fence:
    """What a writer holds: the job, its lease generation and owner; ``check`` right before a
    commit (and before a deletion) raises LeaseLost once the writer is fenced."""

    def __init__(self, job: Store, generation: int, owner: str | None = None):
        self.job, self.generation, self.owner = job, generation, owner

    @classmethod
    def of(cls, job: Store, lease: Lease) -> Fence:
        return cls(job, lease.generation, lease.owner)

    def check(self) -> None:
        check(self.job, self.generation, self.owner)
