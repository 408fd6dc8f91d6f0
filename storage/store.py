"""One fsspec filesystem rooted at a URL: the only place bytes are read or written.

Invariants:
- Every call goes through :func:`storage.retry.call`: transient errors are retried, permanent
  ones raise StorageError naming the full URL.
- What differs between kinds of store (how a file is created only if absent, replaced
  atomically, written and read with its hash, how a checkpoint commits) is the store's
  ``backend`` (storage.backends), chosen once when the store is opened; nothing here branches
  on the kind of store.
- ``write_file`` and ``read_file`` hash the bytes in the same pass that moves them.
- ``create`` is create-only: it raises FileExistsError when the object exists (O_EXCL/link
  locally, ifGenerationMatch=0 on GCS, If-None-Match on S3).
- Paths given to a Store are relative to its root and may not escape it.
- ``private`` documents are created readable by their owner alone (0600) where the store has
  file modes; object stores keep them as their bucket's access rules say.
- Every read and existence check asks the store itself: fsspec's cached listings (s3fs and
  gcsfs answer ``exists`` and ``cat_file`` from a listing made earlier) are dropped for the path
  first, so an object another process wrote since is never hidden.
"""

from __future__ import annotations

import copy
import hashlib
import os
import posixpath
import threading
from dataclasses import dataclass
from typing import Any

import fsspec

from timellm_job.jobs.messages import first_line
from timellm_job.storage.backends import CHUNK, Backend, backend_for
from timellm_job.storage.retry import StorageError, call

PROBE_S = float(os.environ.get("TIMELLM_JOB_PROBE_S", "15"))  # a root that does not answer fails this fast
PRIVATE_MODE = 0o600  # documents that may hold secrets (the stored job.yaml), on stores with file modes
Buffers = bytes | bytearray | memoryview | list | tuple  # a list: the file is their concatenation


@dataclass
class Written:
    """What a file write produced: its size and sha256."""

    size: int
    sha256: str


class Unreachable(StorageError):
    """The store did not answer (network, endpoint, credentials): nothing was read or written."""


class NotAFolder(StorageError):
    """The store's root, or a folder above it, is a file: bad input, not an outage."""


class Store:
    """A filesystem rooted at ``url``; all paths are relative ("a/b/c")."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        self.options = dict(options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ValueError, ImportError, TypeError) as exc:
            raise StorageError(f"cannot open storage {url!r}: {exc}") from exc
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.retry_s: float | None = None  # None: storage.retry's default bound
        protocol = self.fs.protocol
        self.protocols = tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)
        self.backend: Backend = backend_for(self.fs, self.protocols)

    @property
    def is_local(self) -> bool:
        """The store's paths are this machine's paths (a disk, or a mount such as Drive)."""
        return self.backend.local

    # --- paths -------------------------------------------------------------------------------
    def full(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if rel:
            parts = rel.split("/")
            if any(p in ("..", ".", "") for p in parts):
                raise StorageError(f"path {rel!r} escapes or is malformed under {self.url}")
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    def child(self, rel: str) -> Store:
        """A Store rooted at a sub-path, sharing this one's filesystem."""
        sub = Store.__new__(Store)
        sub.url, sub.options, sub.fs, sub.backend = self.url_of(rel), self.options, self.fs, self.backend
        sub.protocols, sub.retry_s = self.protocols, self.retry_s
        sub.root = self.full(rel)
        return sub

    def probe(self, within_s: float = PROBE_S) -> None:
        """Raise :class:`Unreachable` unless the store answers a listing of the root within
        ``within_s`` seconds, whatever retries the filesystem library makes inside (gcsfs alone
        retries for a minute). A missing folder or bucket is an answer (a new job has none)."""
        answer: list = []

        def ask() -> None:
            try:
                self.fs.ls(self.root or "/", detail=False)
                answer.append(None)
            except NotADirectoryError:
                answer.append(NotAFolder(f"{self.url}: a file stands where its folder would be"))
            except FileNotFoundError:
                answer.append(None)
            except BaseException as exc:  # noqa: BLE001 - judged below
                answer.append(exc)

        asker = threading.Thread(target=ask, name="storage-probe", daemon=True)
        asker.start()
        asker.join(within_s)
        if not answer:
            raise Unreachable(f"cannot reach {self.url}: no answer within {within_s:.0f} s")
        if isinstance(answer[0], NotAFolder):
            raise answer[0]
        if answer[0] is not None:
            exc = answer[0]
            cause = first_line(exc)
            raise Unreachable(f"cannot reach {self.url}: {type(exc).__name__}: {cause}")

    def bounded(self, retry_s: float) -> Store:
        """This store with its retries bounded by ``retry_s`` seconds in all (the lease's calls:
        a retry must never outlast a renewal interval)."""
        other = copy.copy(self)
        other.retry_s = retry_s if self.retry_s is None else min(retry_s, self.retry_s)
        return other

    def _fresh(self, path: str) -> str:
        """``path``, with any listing fsspec cached of it or its folders dropped (see above)."""
        self.fs.invalidate_cache(path)
        return path

    def _call(self, fn, rel: str, what: str):
        """Reads answer FileNotFoundError; a write that finds no bucket/folder is a StorageError."""
        answers = (FileNotFoundError, FileExistsError) if what in ("reading", "checking", "hashing") \
            else (FileExistsError,)
        return call(fn, self.url_of(rel), what, total_s=self.retry_s, answers=answers)

    # --- queries -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(lambda: self.fs.exists(self._fresh(self.full(rel))), rel, "checking")

    def list_dir(self, rel: str = "") -> list[tuple[str, str, int]]:
        """(name, type, size) of the entries directly under ``rel``; [] if it does not exist."""
        path = self.full(rel)

        def ls():
            self.fs.invalidate_cache(path)
            try:
                return self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []

        out = []
        for entry in self._call(ls, rel, "listing"):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if name and entry["name"].rstrip("/") != path.rstrip("/"):
                out.append((name, entry.get("type", "file"), int(entry.get("size") or 0)))
        return sorted(out)

    # --- whole small objects -----------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self._call(lambda: self.fs.cat_file(self._fresh(self.full(rel))), rel, "reading")

    def create(self, rel: str, data: bytes, private: bool = False) -> None:
        """Write ``data`` only if nothing is at ``rel``; FileExistsError otherwise. ``private``:
        readable by its owner alone where the store has file modes (a disk, a mount)."""
        path = self.full(rel)
        mode = PRIVATE_MODE if private else None
        return self._call(lambda: self.backend.create(path, data, mode), rel, "creating")

    def replace(self, rel: str, data: bytes, durable: bool = True, private: bool = False) -> None:
        """Atomically replace the object at ``rel`` with ``data`` (readers see old or new).

        ``durable=False`` skips the fsyncs (still atomic): for documents rewritten every
        second whose loss in a crash costs nothing, like the trainer's heartbeat.
        """
        path = self.full(rel)
        mode = PRIVATE_MODE if private else None
        return self._call(lambda: self.backend.replace(path, data, durable, mode), rel, "replacing")

    def copy_file(self, src: str, dst: str) -> int:
        """Stream the file at ``src`` to ``dst`` (never whole in memory); returns its size."""
        s, d = self.full(src), self.full(dst)

        def copy() -> int:
            size = 0
            if self.backend.local:
                os.makedirs(posixpath.dirname(d), exist_ok=True)
            with self.fs.open(s, "rb", block_size=CHUNK) as f, self.fs.open(d, "wb") as out:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            return size

        return self._call(copy, dst, "copying")

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self.full(rel)

        def rm():
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call(rm, rel, "removing")

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename a folder (the POSIX commit step); the destination must not exist."""
        s, d = self.full(src), self.full(dst)
        self._call(lambda: self.backend.rename_dir(s, d), dst, "committing")

    def makedirs(self, rel: str) -> None:
        path = self.full(rel)
        call(lambda: self.backend.makedirs(path), self.url_of(rel), "creating folder", answers=())

    # --- files with hashes -------------------------------------------------------------------
    def write_file(self, rel: str, data: Buffers, fsync: bool = True) -> Written:
        """Write a whole file, hashing it in the same pass; local files are fsynced.

        ``data`` is bytes or a list of buffers (the file is their concatenation, written without
        joining them).
        """
        path = self.full(rel)
        chunks = []
        for part in (data if isinstance(data, (list, tuple)) else [data]):
            view = memoryview(part).cast("B")
            chunks.extend(view[i:i + CHUNK] for i in range(0, len(view), CHUNK))
        total = sum(len(c) for c in chunks)
        return self._call(lambda: Written(total, self.backend.write(path, chunks, fsync)), rel, "writing")

    def read_file(self, rel: str) -> tuple[bytearray, str]:
        """Read a whole file and its sha256 in one pass over the bytes."""
        path = self._fresh(self.full(rel))
        return self._call(lambda: self.backend.read(path), rel, "reading")

    def download(self, rel: str, dest: str | os.PathLike) -> int:
        """Stream a file to a local path (never whole in memory); returns its size."""
        path = self._fresh(self.full(rel))

        def get() -> int:
            size = 0
            with self.fs.open(path, "rb", block_size=CHUNK) as f, open(dest, "wb") as out:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            return size

        return self._call(get, rel, "reading")

    def hash_file(self, rel: str) -> tuple[int, str]:
        """Size and sha256 of a file, streamed (nothing kept in memory)."""
        path = self._fresh(self.full(rel))

        def run() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            with self.fs.open(path, "rb", block_size=CHUNK) as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
            return size, digest.hexdigest()

        return self._call(run, rel, "hashing")


def open_store(url: str, options: dict[str, Any] | None = None) -> Store:
    """Open the storage at ``url`` (local path, file://, memory://, gs://, s3://)."""
    return Store(url, options)
