"""Test-only fsspec filesystems that misbehave on purpose: short writes, writes whose bytes never
reach the disk, ENOSPC, EIO, torn reads, flipped bytes, slow and blocked calls.

- ``faulty:///path``: a local disk (a LocalFileSystem, so storage uses its POSIX backend:
  fsync, rename, link).
- ``faultymem://path``: an object store (a MemoryFileSystem, so storage uses its object-store
  backend: create-only PUTs, no rename). Like memory://, an object exists from the moment it is
  opened for writing (real object stores show it at the end of the upload).

Faults are :class:`Fault` rules, matched by operation and a substring of the path. In the test
process they are set on ``FAULTS`` (shared by every instance: fsspec caches instances); other
processes read them from the JSON plan named by ``TIMELLM_TEST_FAULT_PLAN`` (re-read at each
call, so a test can change faults while a job runs). Nothing in the product knows these exist:
tests/faults/sitecustomize.py registers the protocols in the processes that tests start.

Operations: ``write`` (file data written), ``read`` (file data read), ``create`` (a create-only
PUT or link), ``ls``, ``rm``. Kinds:

- ``short``: a file takes at most ``limit`` bytes, then every write accepts none (a disk that
  filled up without saying so).
- ``drop``: writes report every byte, but only ``limit`` bytes of the file are kept (a mount that
  lost the rest).
- ``enospc``, ``eio``: the call raises OSError with that errno.
- ``torn``: a read ends after ``limit`` bytes; ``flip``: one byte of what is read is changed.
- ``slow``: the call sleeps ``delay_s`` first; ``block``: it waits for ``event`` (in-process).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

PLAN_ENV = "TIMELLM_TEST_FAULT_PLAN"


@dataclass
class Fault:
    op: str
    kind: str
    match: str = ""
    times: int | None = None  # None: every matching call
    limit: int = 0
    delay_s: float = 0.0
    event: threading.Event | None = field(default=None, compare=False)
    hits: int = 0

    def applies(self, op: str, path: str) -> bool:
        return self.op == op and self.match in path and (self.times is None or self.hits < self.times)


FAULTS: list[Fault] = []
_lock = threading.Lock()


def _plan() -> list[Fault]:
    path = os.environ.get(PLAN_ENV)
    if not path:
        return []
    try:
        with open(path) as f:
            rules = json.load(f)
    except (OSError, ValueError):
        return []
    return [Fault(**{k: v for k, v in r.items() if k in Fault.__dataclass_fields__ and k != "event"}) for r in rules]


def fault_for(op: str, path: str) -> Fault | None:
    """The first rule that applies to this call (counted as hit), or None."""
    with _lock:
        for rule in FAULTS + _plan():
            if rule.applies(op, path):
                rule.hits += 1
                return rule
    return None


def _before(op: str, path: str) -> Fault | None:
    """Faults that act before a call (raise, sleep, block); returns the rule for the call itself."""
    rule = fault_for(op, path)
    if rule is None:
        return None
    if rule.kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
    if rule.kind == "eio":
        raise OSError(errno.EIO, "Input/output error (injected)", path)
    if rule.kind == "slow":
        time.sleep(rule.delay_s)
    if rule.kind == "block" and rule.event is not None:
        rule.event.wait()
    return rule


class FaultyFile:
    """A file object whose writes and reads obey the faults of its path."""

    def __init__(self, inner, path: str, writing: bool):
        self._inner, self._path, self._written = inner, path, 0
        self._writing = writing

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        rule = _before("write", self._path)
        if rule is not None and rule.kind == "short":
            room = max(0, rule.limit - self._written)
            view = view[:room]
            if not len(view):
                return 0
            self._inner.write(view)
            self._written += len(view)
            return len(view)
        if rule is not None and rule.kind == "drop":
            kept = view[:max(0, rule.limit - self._written)]
            if len(kept):
                self._inner.write(kept)
            self._written += len(view)
            return len(view)
        self._inner.write(view)
        self._written += len(view)
        return len(view)

    def _read_rule(self):
        return _before("read", self._path)

    def read(self, n: int = -1) -> bytes:
        rule = self._read_rule()
        data = self._inner.read(n)
        return _mangle(rule, data, self)

    def readinto(self, buf) -> int:
        rule = self._read_rule()
        if rule is not None and rule.kind == "torn":
            left = max(0, rule.limit - getattr(self, "_got", 0))
            view = memoryview(buf)[:left]
            n = self._inner.readinto(view) if len(view) else 0
            self._got = getattr(self, "_got", 0) + n
            return n
        n = self._inner.readinto(buf)
        if rule is not None and rule.kind == "flip" and n:
            memoryview(buf)[0] ^= 0xFF
        return n

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._inner.close()


def _mangle(rule: Fault | None, data: bytes, f: FaultyFile) -> bytes:
    if rule is None or not data:
        return data
    if rule.kind == "torn":
        left = max(0, rule.limit - getattr(f, "_got", 0))
        data = data[:left]
        f._got = getattr(f, "_got", 0) + len(data)
        return data
    if rule.kind == "flip":
        return bytes([data[0] ^ 0xFF]) + data[1:]
    return data


class FaultyLocalFileSystem(LocalFileSystem):
    """A local disk whose calls obey ``FAULTS`` (storage sees it as POSIX)."""

    protocol = ("faulty",)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        inner = super()._open(path, mode, block_size, **kwargs)
        return FaultyFile(inner, self._strip_protocol(path), "w" in mode)

    def ls(self, path, detail=False, **kwargs):
        _before("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        _before("rm", str(path))
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


class FaultyMemoryFileSystem(MemoryFileSystem):
    """An object store whose calls obey ``FAULTS`` (create-only PUTs, like memory://)."""

    protocol = ("faultymem", "memory")
    store: dict = {}  # its own objects, apart from memory://'s
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("faultymem://", "memory://"):
            path = path.removeprefix(prefix)
        path = path.lstrip("/").rstrip("/")
        return "/" + path if path else ""

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        if "x" in mode:
            _before("create", path)
        inner = super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        return FaultyFile(inner, path, "w" in mode or "x" in mode)

    def ls(self, path, detail=True, **kwargs):
        _before("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        _before("rm", str(path))
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def register() -> None:
    fsspec.register_implementation("faulty", FaultyLocalFileSystem, clobber=True)
    fsspec.register_implementation("faultymem", FaultyMemoryFileSystem, clobber=True)


def write_plan(path, rules: list[dict]) -> None:
    """Set the faults of the processes that read ``path`` (atomically: a reader sees old or new)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rules, f)
    os.replace(tmp, path)


register()
