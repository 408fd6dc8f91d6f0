"""What each kind of store can do, behind one small protocol: the one place that knows how a
POSIX filesystem and an object store write, read and rename. Backends expose capabilities
(``local``, ``create_only``, ``rename_dir``); which commit protocol a store gets is chosen above
them (storage.commit_strategy), so nothing here names a strategy.

Invariants:
- ``create`` writes only if nothing is at the path (FileExistsError otherwise); on a backend
  whose ``create_only`` is False that is a check-then-write that two writers can both pass.
- ``replace`` is atomic: a reader sees the old bytes or the new, never a mix.
- ``write`` and ``read`` hash the bytes in the same pass that moves them. ``write`` returns
  only once every byte was accepted: a write that reports fewer bytes than it was given is
  continued, one that reports none fails, and on POSIX the file's size on disk is compared with
  the count hashed before it returns (a short write is an error, never a smaller file).
- Every file is opened through the store's fsspec filesystem (``fs.open``), so a filesystem
  wrapped for a test sees every byte; only metadata calls (link, rename, fsync) go to the OS.
- POSIX: written files are fsynced (unless asked not to), ``replace`` and ``create`` go through
  a private temporary sibling (then rename or hard link) and fsync the folder, and a folder
  renames atomically onto a name that is free (or an empty folder), never onto a non-empty one.
  Object stores: one PUT is atomic by itself and folders do not exist.
- Calls here do not retry: storage.store wraps each in storage.retry.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import queue
import threading
import uuid
from typing import Protocol

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

CHUNK = 8 * 2**20
CREATE_ONLY_PROTOCOLS = {"gs", "gcs", "s3", "s3a", "memory"}  # fsspec backends with a real create-only PUT


class Backend(Protocol):
    kind: str
    local: bool  # the store's paths are this machine's paths (a disk, or a mount such as Drive)
    create_only: bool  # ``create`` is an atomic write-if-absent that excludes every other writer
    renames_folders: bool  # ``rename_dir`` moves a whole folder in one atomic step

    def makedirs(self, path: str) -> None: ...

    def create(self, path: str, data: bytes) -> None: ...

    def replace(self, path: str, data: bytes, durable: bool) -> None: ...

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str: ...

    def read(self, path: str) -> tuple[bytearray, str]: ...

    def rename_dir(self, src: str, dst: str) -> None: ...


class Posix:
    """A local disk or a mount of one (Colab's Drive): fsync, rename, O_EXCL/link."""

    kind, local, create_only, renames_folders = "posix", True, True, True

    def __init__(self, fs: AbstractFileSystem):
        self.fs = fs

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def _write_whole(self, path: str, data: bytes, durable: bool, mode: int | None = None) -> None:
        with self.fs.open(path, "wb") as f:
            _write_all(f, memoryview(data), path)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(path, mode)

    def create(self, path: str, data: bytes, mode: int | None = None) -> None:
        # a private temporary hard-linked into place: link() fails if the name exists, and
        # readers never see a created-but-empty file
        self.makedirs(posixpath.dirname(path))
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._write_whole(tmp, data, durable=True, mode=mode)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links (some FUSE mounts): O_EXCL
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
                os.close(fd)
                self._write_whole(path, data, durable=True)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        _fsync_dir(posixpath.dirname(path))

    def replace(self, path: str, data: bytes, durable: bool, mode: int | None = None) -> None:
        folder = posixpath.dirname(path)
        self.makedirs(folder)
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._write_whole(tmp, data, durable, mode)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        if durable:
            _fsync_dir(folder)

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str:
        """A writer thread writes chunk n while this thread hashes chunk n+1: about max(hash,
        write) rather than their sum."""
        digest = hashlib.sha256()
        self.makedirs(posixpath.dirname(path))
        total = sum(len(c) for c in chunks)
        with self.fs.open(path, "wb") as f:
            _pipelined(chunks, digest.update, lambda chunk: _write_all(f, chunk, path))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            on_disk = os.fstat(f.fileno()).st_size
        if on_disk != total:
            raise OSError(errno.ENOSPC, f"short write: {on_disk} of {total} bytes reached the disk", path)
        return digest.hexdigest()

    def read(self, path: str) -> tuple[bytearray, str]:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            view = memoryview(buf)
            got = _pipelined_read(f, view, digest.update)
        if got != size:
            del view
            buf = buf[:got]
        return buf, digest.hexdigest()

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomic, onto a free name (or an empty folder): a non-empty ``dst`` raises
        FileExistsError and stays as it is (rename(2) refuses to replace it)."""
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) and os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "exists", dst) from None
            raise
        _fsync_dir(posixpath.dirname(dst))


class ObjectStore:
    """Any other fsspec filesystem (GCS, S3, memory, ...): whole-object PUTs, no folders; a
    create-only PUT where the protocol has one (``CREATE_ONLY_PROTOCOLS``), otherwise fsspec's
    exists-then-write fallback (``create_only`` False: the lease cannot rely on it)."""

    kind, local, renames_folders = "object-store", False, False

    def __init__(self, fs: AbstractFileSystem, protocols: tuple[str, ...]):
        self.fs = fs
        self.create_only = bool(set(protocols) & CREATE_ONLY_PROTOCOLS)

    def makedirs(self, path: str) -> None:
        pass  # prefixes exist as soon as an object is under them

    def create(self, path: str, data: bytes, mode: int | None = None) -> None:
        self.fs.pipe_file(path, data, mode="create")

    def replace(self, path: str, data: bytes, durable: bool, mode: int | None = None) -> None:
        self.fs.pipe_file(path, data)

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "wb", block_size=max(CHUNK, 5 * 2**20)) as f:
            for chunk in chunks:
                digest.update(chunk)
                _write_all(f, chunk, path)
        return digest.hexdigest()

    def read(self, path: str) -> tuple[bytearray, str]:
        digest, parts = hashlib.sha256(), bytearray()
        with self.fs.open(path, "rb", block_size=CHUNK, cache_type="none") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                parts += chunk
        return parts, digest.hexdigest()

    def rename_dir(self, src: str, dst: str) -> None:
        raise NotImplementedError("object stores have no atomic folder rename")


def backend_for(fs: AbstractFileSystem, protocols: tuple[str, ...]) -> Backend:
    return Posix(fs) if isinstance(fs, LocalFileSystem) else ObjectStore(fs, protocols)


def _write_all(f, chunk: memoryview, path: str) -> None:
    """Write every byte of ``chunk``: a short count is continued from where it stopped; a write
    that accepts nothing is an error (a full disk that did not say so)."""
    view = memoryview(chunk).cast("B")
    while len(view):
        n = f.write(view)
        if n is None:  # a buffered writer of fsspec's: it took everything (or raised)
            return
        if n <= 0:
            raise OSError(errno.ENOSPC, f"a write accepted 0 of {len(view)} bytes", path)
        view = view[n:]


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
