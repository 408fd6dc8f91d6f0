"""Clocks for lease tests: a machine whose wall clock is off, and time that passes on demand."""

from __future__ import annotations

import threading
import time

from timellm_job.storage import lease as leases


class SkewedClock:
    """This machine's clock, ``offset_s`` ahead (negative: behind); monotonic time is real."""

    def __init__(self, offset_s: float):
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock:
    """Time that passes only when slept through, at once: a TTL of an hour costs nothing."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start
        self.slept = 0.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


class NoWaiting(SkewedClock):
    """A taker that may not watch: any wait raises :class:`Watched` (it did not win at once)."""

    class Watched(Exception):
        pass

    def __init__(self):
        super().__init__(0.0)

    def sleep(self, seconds: float) -> None:
        raise NoWaiting.Watched()


class Renewer:
    """A live holder: renews ``lease`` every third of its TTL on ``clock`` until stopped."""

    def __init__(self, job, lease, ttl_s: float, clock=leases.SYSTEM):
        self.job, self.lease, self.ttl_s, self.clock = job, lease, ttl_s, clock
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.ttl_s / 3):
            try:
                leases.renew(self.job, self.lease, self.ttl_s, self.clock)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.errors.append(exc)
                return

    def __enter__(self) -> Renewer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


class HolderRenewsMeanwhile(ManualClock):
    """A taker's clock during whose waits a live holder renews its lease every third of its TTL,
    stamping its document with its own clock, ``holder_offset_s`` off: instant and repeatable."""

    def __init__(self, job, holder, ttl_s: float, holder_offset_s: float):
        super().__init__()
        self.job, self.holder, self.ttl_s, self.renewed = job, holder, ttl_s, self.now
        self.holder_clock = _Offset(self, holder_offset_s)

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if self.now - self.renewed >= self.ttl_s / 3:
            leases.renew(self.job, self.holder, self.ttl_s, self.holder_clock)
            self.renewed = self.now


class _Offset:
    def __init__(self, base: ManualClock, offset_s: float):
        self.base, self.offset_s = base, offset_s

    def time(self) -> float:
        return self.base.time() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    def sleep(self, seconds: float) -> None:
        self.base.sleep(seconds)
