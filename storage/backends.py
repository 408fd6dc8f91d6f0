"""What each kind of store can do, behind one small protocol: the one place that knows how a
POSIX filesystem and an object store write, read and commit. A new backend gets its class here
(and, if it commits differently, its strategy in storage.commit_strategy); nothing else in the
project branches on the kind of store.

Invariants:
- ``create`` writes only if nothing is at the path (FileExistsError otherwise); on a backend
  whose ``create_only`` is False that is a check-then-write that two writers can both pass.
- ``replace`` is atomic: a reader sees the old bytes or the new, never a mix.
- ``write`` and ``read`` hash the bytes in the same pass that moves them.
- POSIX: written files are fsynced (unless asked not to), ``replace`` and ``create`` go through
  a private temporary sibling (then rename or hard link) and fsync the folder, and a checkpoint
  folder commits by an atomic rename. Object stores: one PUT is atomic by itself, folders do
  not exist, and a checkpoint commits by its create-only manifest.
- Calls here do not retry: storage.store wraps each in storage.retry.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import threading
import uuid
from typing import Protocol

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from storage.commit_strategy import CommitStrategy, CreateOnlyManifest, RenameFolder

CHUNK = 8 * 2**20
CREATE_ONLY_PROTOCOLS = {"gs", "gcs", "s3", "s3a", "memory"}  # fsspec backends with a real create-only PUT


class Backend(Protocol):
    kind: str
    local: bool  # the store's paths are this machine's paths (a disk, or a mount such as Drive)
    create_only: bool  # ``create`` is an atomic write-if-absent that excludes every other writer

    def commit_strategy(self) -> CommitStrategy: ...

    def makedirs(self, path: str) -> None: ...

    def create(self, path: str, data: bytes) -> None: ...

    def replace(self, path: str, data: bytes, durable: bool) -> None: ...

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str: ...

    def read(self, path: str) -> tuple[bytearray, str]: ...

    def rename_dir(self, src: str, dst: str) -> None: ...


class Posix:
    """A local disk or a mount of one (Colab's Drive): fsync, rename, O_EXCL/link."""

    kind, local, create_only = "posix", True, True

    def commit_strategy(self) -> CommitStrategy:
        return RenameFolder()

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def create(self, path: str, data: bytes) -> None:
        # a private temporary hard-linked into place: link() fails if the name exists, and
        # readers never see a created-but-empty file
        self.makedirs(posixpath.dirname(path))
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

    def replace(self, path: str, data: bytes, durable: bool) -> None:
        folder = posixpath.dirname(path)
        self.makedirs(folder)
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
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

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str:
        """A writer thread writes chunk n while this thread hashes chunk n+1: about max(hash,
        write) rather than their sum."""
        digest = hashlib.sha256()
        self.makedirs(posixpath.dirname(path))
        with open(path, "wb", buffering=0) as f:
            _pipelined(chunks, digest.update, f.write)
            if fsync:
                os.fsync(f.fileno())
        return digest.hexdigest()

    def read(self, path: str) -> tuple[bytearray, str]:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            view = memoryview(buf)
            got = _pipelined_read(f, view, digest.update)
        if got != size:
            del view
            buf = buf[:got]
        return buf, digest.hexdigest()

    def rename_dir(self, src: str, dst: str) -> None:
        if os.path.exists(dst):
            raise FileExistsError(dst)
        os.rename(src, dst)
        _fsync_dir(posixpath.dirname(dst))


class ObjectStore:
    """Any other fsspec filesystem (GCS, S3, memory, ...): whole-object PUTs, no folders; a
    create-only PUT where the protocol has one (``CREATE_ONLY_PROTOCOLS``), otherwise fsspec's
    exists-then-write fallback (``create_only`` False: the lease cannot rely on it)."""

    kind, local = "object-store", False

    def __init__(self, fs: AbstractFileSystem, protocols: tuple[str, ...]):
        self.fs = fs
        self.create_only = bool(set(protocols) & CREATE_ONLY_PROTOCOLS)

    def commit_strategy(self) -> CommitStrategy:
        return CreateOnlyManifest(create_only=self.create_only)

    def makedirs(self, path: str) -> None:
        pass  # prefixes exist as soon as an object is under them

    def create(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data, mode="create")

    def replace(self, path: str, data: bytes, durable: bool) -> None:
        self.fs.pipe_file(path, data)

    def write(self, path: str, chunks: list[memoryview], fsync: bool) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "wb", block_size=max(CHUNK, 5 * 2**20)) as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
        return digest.hexdigest()

    def read(self, path: str) -> tuple[bytearray, str]:
        digest, parts = hashlib.sha256(), bytearray()
        with self.fs.open(path, "rb", block_size=CHUNK, cache_type="none") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                parts += chunk
        return parts, digest.hexdigest()

    def rename_dir(self, src: str, dst: str) -> None:
        raise NotImplementedError("object stores have no atomic folder rename: commit by create-only manifest")


def backend_for(fs: AbstractFileSystem, protocols: tuple[str, ...]) -> Backend:
    return Posix() if isinstance(fs, LocalFileSystem) else ObjectStore(fs, protocols)


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
