"""Checkpoint saving off the training path.

Invariants:
- The training thread only captures a host-memory snapshot (trainer.checkpoint_state.capture); a single
  background thread serializes, commits through ``storage`` and applies retention.
- At most one write is in flight: ``submit`` first waits for the previous one.
- A failed background save is re-raised on the training thread at the next ``submit``/``wait``
  (a checkpoint that silently did not happen is worse than a crash).
- An id that is committed already is verified, not assumed: when its files match its manifest it
  is kept (on a deterministic resume it holds the same bytes; on a GPU a run's own earlier bytes)
  and nothing is written; when they do not (bitrot, a sync that zero-filled a file), it is set
  apart (storage.set_apart: moved, never deleted) and committed again from this snapshot.
- A best is read back and verified after its commit before it counts as whole: retention keeps
  the previous best until then. A best that does not read back whole is set apart and written
  again once; a second failure is an error.
- Retention keeps the newest checkpoint of each kind known whole by hash (``verified``: what
  this saver committed, and what the trainer read back and verified), whatever the sizes say.
- With a fence (the orchestrator's lease generation), a commit or clean-up of a writer whose
  lease was taken over raises LeaseLost on the training thread: nothing is written or deleted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from timellm_job.storage import AlreadyCommitted, Store, commit_checkpoint
from timellm_job.storage.checkpoints import verify
from timellm_job.storage.layout import CHECKPOINTS, checkpoint_id
from timellm_job.storage.lease import Fence
from timellm_job.storage.manifest import MANIFEST, Manifest, ManifestError, parse_manifest
from timellm_job.storage.retention import clean_up
from timellm_job.storage.set_apart import set_apart
from timellm_job.trainer.checkpoint_state import Snapshot

BACKGROUND_NICE = int(os.environ.get("TIMELLM_JOB_SAVER_NICE", "10"))

log = logging.getLogger(__name__)


def _lower_priority() -> None:
    """Let training threads win the CPU: a background save only needs to finish before the next."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):
        pass


def _say(msg: str) -> None:
    log.info("%s", msg)


class CheckpointSaver:
    def __init__(self, job: Store, spec_hash: str, save_total_limit: int, background: bool = True,
                 on_commit: Callable[[Manifest], None] | None = None, background_workers: int = 4,
                 fence: Fence | None = None, spec_hashes: frozenset[str] | None = None,
                 retention: bool = True):
        self.job, self.spec_hash, self.limit, self.fence = job, spec_hash, save_total_limit, fence
        self.spec_hashes = spec_hashes or frozenset({spec_hash})  # the job's (earlier versions' too)
        self.retention = retention  # False: commit only, delete nothing (an import adds, never removes)
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
            manifest = self._commit(snapshot, step, kind, progress, metadata, off_thread)
            if manifest is None:
                return
            if kind == "best":  # the previous best stays until this one reads back whole
                manifest = self._read_back(manifest, snapshot, progress, metadata, off_thread)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._error = exc
            return
        self.committed.append(manifest)
        self.verified.add(manifest.id)
        self.last_commit_s = time.monotonic() - started
        try:
            if self.retention:
                clean_up(self.job, self.limit, spec_hash=self.spec_hashes, fence=self.fence, verified=self.verified)
            if self.on_commit:
                self.on_commit(manifest)
        except BaseException as exc:  # noqa: BLE001
            self._error = exc

    def _commit(self, snapshot: Snapshot, step: int, kind: str, progress: list[int], metadata: dict,
                off_thread: bool) -> Manifest | None:
        """Commit the snapshot; None when its id is committed already and verifies (kept as is)."""
        def commit() -> Manifest:
            return commit_checkpoint(self.job, step, kind, snapshot.to_files(), self.spec_hash,
                                     progress=progress, metadata=metadata,
                                     workers=self.background_workers if off_thread else 4, fence=self.fence)

        try:
            return commit()
        except AlreadyCommitted:
            pass
        ckpt_id = checkpoint_id(step, kind)
        try:
            existing = parse_manifest(self.job.read_bytes(f"{CHECKPOINTS}/{ckpt_id}/{MANIFEST}"))
        except (FileNotFoundError, ManifestError) as exc:
            _say(f"warning: checkpoint {ckpt_id} exists and cannot be read ({exc}); it is left as it is "
                 "and this save is skipped")
            return None
        if existing.spec_hash not in self.spec_hashes:
            _say(f"warning: checkpoint {ckpt_id} holds another spec's checkpoint; this save is skipped")
            return None
        problems = verify(self.job, existing)
        if not problems:
            self.verified.add(existing.id)  # read back: every hash matched
            return None
        where = set_apart(self.job, existing, "; ".join(problems), fence=self.fence)
        _say(f"checkpoint {ckpt_id} was committed but does not verify ({'; '.join(problems)}): set apart as "
             f"{where}; committing it again")
        return commit()

    def _read_back(self, manifest: Manifest, snapshot: Snapshot, progress: list[int], metadata: dict,
                   off_thread: bool) -> Manifest:
        problems = verify(self.job, manifest)
        if not problems:
            return manifest
        where = set_apart(self.job, manifest, "; ".join(problems), fence=self.fence)
        _say(f"best checkpoint {manifest.id} did not read back whole ({'; '.join(problems)}): set apart as "
             f"{where}; writing it again")
        again = commit_checkpoint(self.job, manifest.step, "best", snapshot.to_files(), self.spec_hash,
                                  progress=progress, metadata=metadata,
                                  workers=self.background_workers if off_thread else 4, fence=self.fence)
        problems = verify(self.job, again)
        if problems:
            raise OSError(f"best checkpoint {again.id} did not read back whole twice: {'; '.join(problems)}; "
                          f"the store loses bytes ({self.job.url})")
        return again

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
