"""What a job's data *is*: the sha256 of its CSV, wherever the file lies.

A job is identified by what it trains on, not by where the file is: the same job.yaml and the
same CSV on Colab, then on a VM, is the same job; a CSV whose bytes changed is another.

Invariants:
- ``data_sha256`` hashes the file's bytes (streamed through fsspec: local paths, gs://, s3://).
- A digest is remembered on this machine, keyed by the file's path, size and modification time
  (for object stores: size and the store's generation, ETag or modification time), so that
  ``status`` and ``list`` do not read a large CSV again; a file whose size or time changed is
  hashed again. Only callers that read the data anyway (``remember=True``: the trainer, and
  ``submit`` after its checks passed) write the memo, under ``TIMELLM_JOB_CACHE``
  (``~/.cache/timellm-job``), never under a job's storage.
- A file that cannot be read raises :class:`DataUnreadable`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec

from timellm_job.storage.private import write_private

CHUNK = 8 * 2**20


class DataUnreadable(OSError):
    """The data file cannot be read here (missing, no access, another machine's path)."""


def cache_root() -> Path:
    return Path(os.environ.get("TIMELLM_JOB_CACHE") or Path.home() / ".cache" / "timellm-job")


def _stamp(fs, path: str) -> dict | None:
    """What changes when the file changes, as cheaply as the store tells it (None: unknown)."""
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = fs.info(path)
    stamp = {"size": info.get("size")}
    for key in ("generation", "ETag", "etag", "mtime", "LastModified", "updated"):
        if info.get(key) is not None:
            stamp[key] = str(info[key])
    return stamp if len(stamp) > 1 else None


def _memo_path(url: str) -> Path:
    return cache_root() / "data-digests" / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.json"


def data_sha256(url: str, options: dict | None = None, remember: bool = False) -> str:
    """The sha256 of the file at ``url`` (a path or fsspec URL)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        stamp = _stamp(fs, path)
    except FileNotFoundError:
        raise DataUnreadable(f"no such file: {url}") from None
    except Exception as exc:  # noqa: BLE001 - any backend's failure to answer
        raise DataUnreadable(f"cannot read {url}: {exc}") from None
    memo = _memo_path(url)
    if stamp is not None:
        try:
            known = json.loads(memo.read_text())
            if known.get("url") == url and known.get("stamp") == stamp:
                return known["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except Exception as exc:  # noqa: BLE001
        raise DataUnreadable(f"cannot read {url}: {exc}") from None
    sha = digest.hexdigest()
    if remember and stamp is not None:
        try:
            write_private(memo, json.dumps({"url": url, "stamp": stamp, "sha256": sha}).encode())
        except OSError:
            pass  # a memo that cannot be written costs a hash next time, nothing else
    return sha
