"""Checkpoint saving off the training path.

Invariants:
- The training thread only captures a host-memory snapshot (trainer.state.capture); a single
  background thread serializes, commits through ``storage`` and applies retention.
- At most one write is in flight: ``submit`` first waits for the previous one.
- A failed background save is re-raised on the training thread at the next ``submit``/``wait``
  (a checkpoint that silently did not happen is worse than a crash).
- An id that is committed already is skipped: on a deterministic resume it holds the same bytes.
- Retention keeps the newest checkpoint of each kind known whole by hash (``verified``: what
  this saver committed, and what the trainer read back and verified), whatever the sizes say.
- With a fence (the orchestrator's lease generation), a commit or clean-up of a writer whose
  lease was taken over raises LeaseLost on the training thread: nothing is written or deleted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from storage import AlreadyCommitted, Store, commit_checkpoint
from storage.lease import Fence
from storage.manifest import Manifest
from storage.retention import clean_up
from trainer.state import Snapshot

BACKGROUND_NICE = int(os.environ.get("TIMELLM_JOB_SAVER_NICE", "10"))


def _lower_priority() -> None:
    """Let training threads win the CPU: a background save only needs to finish before the next."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):
        pass


class CheckpointSaver:
    def __init__(self, job: Store, spec_hash: str, save_total_limit: int, background: bool = True,
                 on_commit: Callable[[Manifest], None] | None = None, background_workers: int = 4,
                 fence: Fence | None = None):
        self.job, self.spec_hash, self.limit, self.fence = job, spec_hash, save_total_limit, fence
        self.background_workers = background_workers
        self.background, self.on_commit = background, on_commit
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.committed: list[Manifest] = []
        self.submitted: list[tuple[list[int], str]] = []  # (progress, kind) of every save handed to submit
        self.verified: set[str] = set()  # ids known whole by hash: committed here, or read back and verified
        self.last_commit_s: float | None = None  # how long the newest commit took (its write, end to end)

    def _write(self, snapshot: Snapshot, step: int, kind: str, progress: list[int], metadata: dict) -> None:
        off_thread = threading.current_thread() is not threading.main_thread()
        if off_thread:
            _lower_priority()
        started = time.monotonic()
        try:
            manifest = commit_checkpoint(self.job, step, kind, snapshot.to_files(), self.spec_hash,
                                         progress=progress, metadata=metadata,
                                         workers=self.background_workers if off_thread else 4, fence=self.fence)
        except AlreadyCommitted:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._error = exc
            return
        self.committed.append(manifest)
        self.verified.add(manifest.id)
        self.last_commit_s = time.monotonic() - started
        try:
            clean_up(self.job, self.limit, spec_hash=self.spec_hash, fence=self.fence, verified=self.verified)
            if self.on_commit:
                self.on_commit(manifest)
        except BaseException as exc:  # noqa: BLE001
            self._error = exc

    def submit(self, snapshot: Snapshot, step: int, kind: str, progress: list[int], metadata: dict,
               wait: bool = False) -> None:
        self.wait()
        self.submitted.append((list(progress), kind))
        if not self.background or wait:
            self._write(snapshot, step, kind, progress, metadata)
            self._raise()
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot, step, kind, progress, metadata),
                                        name=f"checkpoint-{step}-{kind}", daemon=True)
        self._thread.start()

    def covers(self, progress: list[int]) -> bool:
        """Whether a step or preempt checkpoint of exactly this position was handed to submit
        (committed, or in flight: ``wait`` finishes it)."""
        return any(p == list(progress) and k in ("step", "preempt") for p, k in self.submitted)

    def wait_for(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for the write in flight; True once none is (its error raised)."""
        if self._thread is not None:
            self._thread.join(seconds)
            if self._thread.is_alive():
                return False
        self.wait()
        return True

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
