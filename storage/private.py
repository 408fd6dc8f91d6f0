"""Local files that hold secrets (a job spec with storage credentials, for the processes we start).

Invariants: the file is readable by its owner alone (0600, in a folder created 0700), it is
replaced atomically (a reader sees the old file or the new one), and its bytes never appear in
a process's argv: processes get the file's path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def private_copy(name: str, data: bytes):
    """A private temporary file holding ``data``, removed afterwards; yields its path."""
    with tempfile.TemporaryDirectory(prefix="timellm-job-") as folder:  # created 0700
        path = Path(folder) / name
        write_private(path, data)
        yield path
