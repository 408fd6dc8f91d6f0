"""Retries for storage calls: transient errors are retried, permanent ones fail at once.

Invariants:
- Transient: timeouts, connection resets/refusals, HTTP 408/429/5xx. Retried with exponential
  backoff and jitter, for at most ``TOTAL_S`` seconds, then raised as :class:`StorageError`.
- Permanent: missing object or bucket, permission denied, no space left, anything unknown.
  Raised at once as :class:`StorageError` naming the URL (FileNotFoundError/FileExistsError are
  passed through unchanged: callers use them as answers, not failures).
- A retried call must be idempotent: every call wrapped here writes a whole object or reads one.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

T = TypeVar("T")
TOTAL_S = float(os.environ.get("TIMELLM_JOB_STORAGE_RETRY_S", "60"))
TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNABORTED,
                   errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO}
PERMANENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                   errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EFBIG}


class StorageError(OSError):
    """A storage call that failed for good; the message names the URL and what to do."""


def _http_status(exc: BaseException) -> int | None:
    for attr in ("code", "status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)  # requests and httpx errors (the hub's)
    if isinstance(status, int) and 100 <= status < 600:
        return status
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    return None


# by class name, so neither library is imported to ask: the model hub's (huggingface_hub) and httpx's
PERMANENT_NAMES = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
                   "RemoteEntryNotFoundError"}  # the hub answered: no such thing, or not for you
TRANSIENT_NAMES = {"LocalEntryNotFoundError",  # offline: the hub did not answer, the cache lacks it
                   "ConnectError", "ConnectTimeout", "ReadTimeout", "ReadError", "RemoteProtocolError",
                   "PoolTimeout", "WriteError"}


def _verdict(exc: BaseException) -> bool | None:
    """Whether this one exception is transient; None: it does not say (ask its cause)."""
    name = type(exc).__name__
    if name in PERMANENT_NAMES:
        return False
    if name in TRANSIENT_NAMES:
        return True
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_HTTP
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in TRANSIENT_ERRNO and exc.errno not in PERMANENT_ERRNO
    try:  # aiohttp's client errors are transient: a dropped or refused connection
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                            aiohttp.ServerTimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (the store, or the model hub, may answer next time): the
    one classifier, for storage calls and hub downloads alike. An exception that does not say
    is judged by its cause; unknown is permanent."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def call(fn: Callable[[], T], url: str, what: str, total_s: float | None = None,
         answers: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError)) -> T:
    """Run ``fn`` with retries on transient errors; raise StorageError naming ``url`` otherwise.

    Exceptions in ``answers`` (by default a missing or existing object) are raised unchanged.
    """
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        stop=stop_after_delay(TOTAL_S if total_s is None else total_s),
        reraise=False,
    )
    try:
        return retrying(fn)
    except RetryError as err:
        last = err.last_attempt.exception()
        raise StorageError(f"{what} {url}: still failing after retries: {last!r}") from last
    except answers:
        raise
    except StorageError:
        raise
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError):
            hint = " (does the bucket or folder exist?)"
        elif getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            hint = " (no space left: free some space or point storage.root elsewhere)"
        elif isinstance(exc, PermissionError) or _http_status(exc) in (401, 403):
            hint = " (permission denied: check storage.options credentials)"
        raise StorageError(f"{what} {url}: {exc}{hint}") from exc
    except Exception as exc:
        raise StorageError(f"{what} {url}: {type(exc).__name__}: {exc}") from exc
