"""The job's lease: at most one live orchestrator per job, and a generation number that fences
out every writer that lost it.

Invariants:
- The lease is a sequence of generation documents ``lease/<generation>.json``; the highest is
  the lease. A generation is only ever taken by a create-only write (O_EXCL/link locally,
  ifGenerationMatch=0 on GCS, If-None-Match on S3): of any number of takers racing for the
  next generation exactly one wins, and nothing is deleted before it is taken. Generations only
  grow (a released lease is marked released, never removed).
- A new generation is above every generation the job has recorded anywhere: the lease
  documents, every checkpoint manifest's ``lease_generation`` and ``state.json``'s lease. A
  lease folder deleted by hand (or a job copied without it) never makes new work rank below old.
- A lease document names owner (a random token), host, pid, its TTL, a renewal count and its
  generation, with times of the holder's clock for people to read. Its holder renews it
  (rewrites its own document, the count one higher) every third of the TTL, timed on its own
  monotonic clock; a holder that dies stops renewing.
- Expiry is judged on the observer's own monotonic clock, never by comparing two machines'
  clocks: a lease is taken over only when released, held by a dead pid on this host, or when
  its document stayed unchanged for a whole TTL while the taker watched (Kubernetes' leader
  election judges the same way). A document that changes while watched is a live holder.
  ``live_holder`` (status, stop, list, import) believes a document whose times say it is live,
  and watches one whose times say it expired for a renewal interval before calling it gone.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import psutil

from timellm_job.storage.checkpoints import list_checkpoints
from timellm_job.storage.documents import read_json
from timellm_job.storage.layout import LEASE, LEASES, STATE
from timellm_job.storage.store import Store

_GENERATION = re.compile(r"^(\d{10})\.json$")
KEEP_GENERATIONS = 3  # the newest documents kept as history; older ones are removed by the holder
CHECK_RETRY_S = 10.0  # a fence check's retries in all (well under the default renewal interval, 20 s)
MAX_TTL_S = 24 * 3600.0  # a document claiming a longer TTL is judged with the observer's own


class Clock(Protocol):
    """Time as the lease sees it: ``monotonic`` judges expiry; ``time`` only stamps documents."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM = SystemClock()


def _bounded(job: Store, ttl_s: float | None = None) -> Store:
    """The lease's calls retry for at most a sixth of the TTL (half a renewal interval), so a
    stalled store makes a renewal fail while the lease still holds, never after it lapsed."""
    return job.bounded(CHECK_RETRY_S if ttl_s is None else max(0.5, ttl_s / 6))


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    acquired_at: float  # the holder's clock: for people, never compared with another machine's
    expires_at: float  # likewise
    generation: int = 0
    released: bool = False
    ttl_s: float = 0.0  # 0: written by a version before it (judged with the observer's TTL)
    renewals: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        doc = json.loads(data)
        return cls(**{k: doc[k] for k in ("owner", "host", "pid", "acquired_at", "expires_at")},
                   generation=int(doc.get("generation", 0)), released=bool(doc.get("released", False)),
                   ttl_s=float(doc.get("ttl_s", 0.0) or 0.0), renewals=int(doc.get("renewals", 0) or 0))

    def dead_here(self) -> bool:
        """Held by a process of this host that is gone (no clock involved)."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def holder_is_dead(self, now: float | None = None) -> bool:
        """What the document's own times say (a hint for people: expiry is judged by watching,
        see :func:`acquire` and :func:`live_holder`)."""
        now = time.time() if now is None else now
        return self.released or self.expires_at <= now or self.dead_here()

    def ttl(self, fallback: float) -> float:
        return self.ttl_s if 0 < self.ttl_s <= MAX_TTL_S else fallback


class LeaseHeld(RuntimeError):
    def __init__(self, holder: Lease, why: str = "its lease was renewed while this submit watched it"):
        self.holder = holder
        super().__init__(f"the job is held by orchestrator pid {holder.pid} on {holder.host} ({why}); "
                         f"wait for it to end, or stop it (timellm-job stop)")


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


def live_holder(job: Store, clock: Clock = SYSTEM, ttl_s: float = 60.0) -> Lease | None:
    """The lease's holder, while it lives: not released, not a dead pid on this host, and either
    its document's times say it lives or, when they say it expired (which a clock ahead of the
    holder's also says), the document changes within one renewal interval while watched."""
    holder = read(job)
    if holder is None or holder.dead_here():
        return None
    if holder.expires_at > clock.time():
        return holder
    watch = holder.ttl(ttl_s) / 3 + _poll_s(ttl_s) * 2  # one renewal, and a poll to see it
    start, first = clock.monotonic(), _current(job)
    while clock.monotonic() - start < watch:
        clock.sleep(_poll_s(ttl_s))
        now = _current(job)
        if now != first:
            newer = read(job)
            return newer if newer is not None and not newer.dead_here() else None
    return None


def recorded_generation(job: Store) -> int:
    """The highest lease generation the job has recorded anywhere: its lease documents, its
    checkpoint manifests and its state document (0: none)."""
    return max(newest_generation(job), _recorded_elsewhere(job))


def _recorded_elsewhere(job: Store) -> int:
    """The highest generation in the job's manifests and state document. Each is written by a
    holder after its lease document exists, so a taker that reads these and then finds the lease
    folder unchanged knows of no live holder above what it judged."""
    found = [m.lease_generation or 0 for m in list_checkpoints(job).committed]
    try:
        state = read_json(job, STATE)
    except ValueError:  # a torn state.json records nothing readable
        state = None
    lease = state.get("lease") if isinstance(state, dict) else None
    if isinstance(lease, dict) and isinstance(lease.get("generation"), int):
        found.append(lease["generation"])
    return max(found, default=0)


def _current(job: Store) -> tuple[int, bytes | None]:
    """The top generation and its document's bytes (the legacy lease.json when there is none)."""
    top = newest_generation(job)
    try:
        return top, job.read_bytes(_path(top) if top else LEASE)
    except FileNotFoundError:
        return top, None


def acquire(job: Store, ttl_s: float, clock: Clock = SYSTEM,
            on_wait: Callable[[Lease, float], None] | None = None) -> Lease:
    """Take the next generation of the lease, or raise LeaseHeld naming the live holder.

    A document that is not released and not held by a dead pid of this host is watched: if it
    changes, its holder lives (LeaseHeld); once it stayed the same for a whole TTL on this
    machine's monotonic clock, its holder is gone, whatever its times say. ``on_wait`` is told
    once when watching starts (the holder, and for how long at most).
    """
    job = _bounded(job, ttl_s)
    watched: tuple[int, bytes] | None = None
    since = 0.0
    pruned = 0
    while True:
        top, raw = _current(job)
        if top and raw is None and pruned < 5:
            pruned += 1
            continue  # pruned between the listing and the read: list again
        holder = _parse(raw, top) if raw is not None else None
        if holder is not None and not holder.released and not holder.dead_here():
            key = (top, raw)
            if watched is not None and key != watched:
                raise LeaseHeld(holder)
            if watched is None:
                watched, since = key, clock.monotonic()
                if on_wait is not None:
                    on_wait(holder, holder.ttl(ttl_s))
            left = holder.ttl(ttl_s) - (clock.monotonic() - since)
            if left > 0:
                clock.sleep(min(_poll_s(ttl_s), left))
                continue
        elsewhere = _recorded_elsewhere(job)
        if newest_generation(job) != top:
            watched = None  # a taker came in meanwhile: judge its document
            continue
        now = clock.time()
        generation = max(top, elsewhere) + 1
        mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now + ttl_s, generation,
                     ttl_s=ttl_s)
        try:
            job.create(_path(mine.generation), mine.to_bytes())  # the conditional takeover
        except FileExistsError:
            # another taker won this generation a moment ago: it lives
            winner = _read_generation(job, generation)
            raise LeaseHeld(winner or Lease("?", "?", -1, 0.0, 0.0), "it took the lease as this submit tried to") \
                from None
        for old in generations(job)[:-KEEP_GENERATIONS]:
            if old < mine.generation:
                job.remove(_path(old))
        return mine


def _poll_s(ttl_s: float) -> float:
    return max(0.05, min(1.0, ttl_s / 12))


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


def renew(job: Store, lease: Lease, ttl_s: float, clock: Clock = SYSTEM) -> Lease:
    """Extend the lease; LeaseLost if it was taken over (checked before and after the write:
    a takeover landing between them is seen at the next check, before any commit)."""
    job = _bounded(job, ttl_s)
    check(job, lease.generation, lease.owner)
    lease.expires_at, lease.ttl_s, lease.renewals = clock.time() + ttl_s, ttl_s, lease.renewals + 1
    job.replace(_path(lease.generation), lease.to_bytes())
    check(job, lease.generation, lease.owner)
    return lease


def release(job: Store, lease: Lease, clock: Clock = SYSTEM) -> None:
    """Mark the lease released (its generation stays taken, so generations only grow)."""
    if newest_generation(job) != lease.generation:
        return
    current = _read_generation(job, lease.generation)
    if current is not None and current.owner == lease.owner:
        lease.released = True
        lease.expires_at = clock.time()
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
