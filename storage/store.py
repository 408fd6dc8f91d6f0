"""One fsspec filesystem rooted at a URL: the only place bytes are read or written.

Invariants:
- Every call goes through :func:`storage.retry.call`: transient errors are retried, permanent
  ones raise StorageError naming the full URL.
- ``write_file`` and ``read_file`` hash the bytes in the same pass that moves them.
- On a local filesystem (a disk or Colab's Drive mount) written files are fsynced, and
  ``replace`` is atomic (temporary sibling + fsync + rename + fsync of the folder). On an object
  store a single PUT is atomic by itself.
- ``create`` is create-only: it raises FileExistsError when the object exists (O_EXCL locally,
  ifGenerationMatch=0 on GCS, If-None-Match on S3).
- Paths given to a Store are relative to its root and may not escape it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import posixpath
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.retry import StorageError, call

CHUNK = 8 * 2**20
PROBE_S = float(os.environ.get("TIMELLM_JOB_PROBE_S", "15"))  # a root that does not answer fails this fast
Buffers = bytes | bytearray | memoryview | list | tuple  # a list: the file is their concatenation


@dataclass
class Written:
    """What a file write produced: its size and sha256."""

    size: int
    sha256: str


class Unreachable(StorageError):
    """The store did not answer (network, endpoint, credentials): nothing was read or written."""


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
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.retry_s: float | None = None  # None: storage.retry's default bound
        protocol = self.fs.protocol
        self.protocols = tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)

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
        sub.url, sub.options, sub.fs, sub.is_local = self.url_of(rel), self.options, self.fs, self.is_local
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
            except FileNotFoundError:
                answer.append(None)
            except BaseException as exc:  # noqa: BLE001 - judged below
                answer.append(exc)

        asker = threading.Thread(target=ask, name="storage-probe", daemon=True)
        asker.start()
        asker.join(within_s)
        if not answer:
            raise Unreachable(f"cannot reach {self.url}: no answer within {within_s:.0f} s")
        if answer[0] is not None:
            exc = answer[0]
            cause = (str(exc).strip().splitlines() or [""])[0][:300]
            raise Unreachable(f"cannot reach {self.url}: {type(exc).__name__}: {cause}")

    def bounded(self, retry_s: float) -> Store:
        """This store with its retries bounded by ``retry_s`` seconds in all (the lease's calls:
        a retry must never outlast a renewal interval)."""
        other = copy.copy(self)
        other.retry_s = retry_s if self.retry_s is None else min(retry_s, self.retry_s)
        return other

    def _call(self, fn, rel: str, what: str):
        """Reads answer FileNotFoundError; a write that finds no bucket/folder is a StorageError."""
        answers = (FileNotFoundError, FileExistsError) if what in ("reading", "checking", "hashing") \
            else (FileExistsError,)
        return call(fn, self.url_of(rel), what, total_s=self.retry_s, answers=answers)

    # --- queries -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._call(lambda: self.fs.exists(self.full(rel)), rel, "checking")

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
        return self._call(lambda: self.fs.cat_file(self.full(rel)), rel, "reading")

    def create(self, rel: str, data: bytes) -> None:
        """Write ``data`` only if nothing is at ``rel``; FileExistsError otherwise."""
        path = self.full(rel)
        if self.is_local:
            self._makedirs(posixpath.dirname(path))

            def excl():
                # write a private temporary, then hard-link it into place: link() fails if the
                # name exists, and readers never see a created-but-empty file
                tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise
                except OSError:  # a filesystem without hard links (some FUSE mounts): O_EXCL
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    os.unlink(tmp)
                _fsync_dir(posixpath.dirname(path))

            return self._call(excl, rel, "creating")
        return self._call(lambda: self.fs.pipe_file(path, data, mode="create"), rel, "creating")

    def replace(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Atomically replace the object at ``rel`` with ``data`` (readers see old or new).

        ``durable=False`` skips the fsyncs (still atomic): for documents rewritten every
        second whose loss in a crash costs nothing, like the trainer's heartbeat.
        """
        path = self.full(rel)
        if self.is_local:
            folder = posixpath.dirname(path)
            self._makedirs(folder)
            tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")

            def swap():
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        if durable:
                            os.fsync(f.fileno())
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                if durable:
                    _fsync_dir(folder)

            return self._call(swap, rel, "replacing")
        return self._call(lambda: self.fs.pipe_file(path, data), rel, "writing")

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self.full(rel)

        def rm():
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call(rm, rel, "removing")

    def rename_dir(self, src: str, dst: str) -> None:
        """Local only: atomically rename a folder; the destination must not exist."""
        assert self.is_local, "rename_dir is the local commit step"
        s, d = self.full(src), self.full(dst)

        def mv():
            if os.path.exists(d):
                raise FileExistsError(d)
            os.rename(s, d)
            _fsync_dir(posixpath.dirname(d))

        self._call(mv, dst, "committing")

    def _makedirs(self, path: str) -> None:
        if self.is_local:
            call(lambda: os.makedirs(path, exist_ok=True), path, "creating folder", answers=())

    def makedirs(self, rel: str) -> None:
        self._makedirs(self.full(rel))

    # --- files with hashes -------------------------------------------------------------------
    def write_file(self, rel: str, data: Buffers, fsync: bool = True) -> Written:
        """Write a whole file, hashing it in the same pass; local files are fsynced.

        ``data`` is bytes or a list of buffers (the file is their concatenation, written without
        joining them). Locally a writer thread writes chunk n while this thread hashes chunk n+1,
        so the write costs about max(hash, write) rather than their sum.
        """
        path = self.full(rel)
        chunks = []
        for part in (data if isinstance(data, (list, tuple)) else [data]):
            view = memoryview(part).cast("B")
            chunks.extend(view[i:i + CHUNK] for i in range(0, len(view), CHUNK))
        total = sum(len(c) for c in chunks)

        def put() -> Written:
            digest = hashlib.sha256()
            if self.is_local:
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                with open(path, "wb", buffering=0) as f:
                    _pipelined(chunks, digest.update, f.write)
                    if fsync:
                        os.fsync(f.fileno())
            else:
                with self.fs.open(path, "wb", block_size=max(CHUNK, 5 * 2**20)) as f:
                    for chunk in chunks:
                        digest.update(chunk)
                        f.write(chunk)
            return Written(total, digest.hexdigest())

        return self._call(put, rel, "writing")

    def read_file(self, rel: str) -> tuple[bytearray, str]:
        """Read a whole file and its sha256 in one pass over the bytes (a reader thread reads
        chunk n+1 while this thread hashes chunk n)."""
        path = self.full(rel)

        def get() -> tuple[bytearray, str]:
            digest = hashlib.sha256()
            if self.is_local:
                with open(path, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    buf = bytearray(size)
                    view = memoryview(buf)
                    got = _pipelined_read(f, view, digest.update)
                if got != size:
                    del view
                    buf = buf[:got]
                return buf, digest.hexdigest()
            parts = bytearray()
            with self.fs.open(path, "rb", block_size=CHUNK, cache_type="none") as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    parts += chunk
            return parts, digest.hexdigest()

        return self._call(get, rel, "reading")

    def download(self, rel: str, dest: str | os.PathLike) -> int:
        """Stream a file to a local path (never whole in memory); returns its size."""
        path = self.full(rel)

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
        path = self.full(rel)

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


def _pipelined(chunks: list[memoryview], first, second) -> None:
    """Apply ``first`` to each chunk on this thread and ``second`` on a helper thread, one chunk
    behind (hashlib and file I/O release the GIL, so the two overlap)."""
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def drain():
        while (chunk := q.get()) is not None:
            if not failure:
                try:
                    second(chunk)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    failure.append(exc)

    worker = threading.Thread(target=drain, daemon=True)
    worker.start()
    try:
        for chunk in chunks:
            if failure:
                break
            first(chunk)
            q.put(chunk)
    finally:
        q.put(None)
        worker.join()
    if failure:
        raise failure[0]


def _pipelined_read(f, view: memoryview, consume) -> int:
    """Read ``f`` into ``view`` on a helper thread, calling ``consume`` on each chunk read."""
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def fill():
        got = 0
        try:
            while got < len(view):
                n = f.readinto(view[got:got + CHUNK])
                if not n:
                    break
                q.put((got, n))
                got += n
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failure.append(exc)
        q.put(None)

    reader = threading.Thread(target=fill, daemon=True)
    reader.start()
    total = 0
    while (item := q.get()) is not None:
        off, n = item
        consume(view[off:off + n])
        total = off + n
    reader.join()
    if failure:
        raise failure[0]
    return total


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(url: str, options: dict[str, Any] | None = None) -> Store:
    """Open the storage at ``url`` (local path, file://, memory://, gs://, s3://)."""
    return Store(url, options)
