"""The job's checkpoints as one trainer process sees them: resume from the newest that verifies,
save between optimizer steps.

Invariants:
- Nothing unverified is loaded: rank 0 picks the newest checkpoint that verifies against its
  manifest (skipping, and naming, those that do not); every other rank reads the one rank 0
  chose and verifies it again as it reads.
- Only checkpoints of this job's spec hashes are read (a changed job never resumes another's).
- ``save`` is called by every rank (their RNG states are gathered) and committed by rank 0 alone,
  through trainer.saver (storage's commit protocol, off the training path); with ``wait`` the
  checkpoint is committed on return, on every rank.
- A save flushes the metrics log and event files: what is reported is never newer on disk than
  the newest checkpoint by more than one save interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from timellm_job.jobs import JobSpec
from timellm_job.storage import Store, list_checkpoints, load_newest
from timellm_job.storage.checkpoints import Loaded, load
from timellm_job.storage.lease import Fence
from timellm_job.storage.manifest import Manifest
from timellm_job.trainer import checkpoint_state, determinism, distributed
from timellm_job.trainer.components import DOWNLOAD_LIMIT_S, Identity, Parts, TrainingState
from timellm_job.trainer.memory import MemoryPlan
from timellm_job.trainer.saver import CheckpointSaver
from timellm_job.trainer.telemetry import Reporter

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """Where a process resumed: the checkpoint (None: from the start) and those skipped."""

    manifest: Manifest | None
    skipped: list[str] = field(default_factory=list)
    exactness: str | None = None  # how it continues: trainer.determinism.exactness (None: from the start)

    def to_heartbeat(self) -> dict | None:
        return {"id": self.manifest.id, "step": self.manifest.step} if self.manifest else None


class Checkpointing:
    def __init__(self, spec: JobSpec, job: Store, identity: Identity, world: distributed.World, parts: Parts,
                 reporter: Reporter, attempt: int, fence: Fence | None, background: bool = True):
        self.spec, self.job, self.identity, self.world = spec, job, identity, world
        self.parts, self.reporter, self.attempt = parts, reporter, attempt
        self.saver = CheckpointSaver(job, identity.hash, spec.storage.save_total_limit, background=background,
                                     fence=fence, spec_hashes=identity.hashes) if world.main else None
        self.host_buffers = checkpoint_state.HostBuffers()

    def committed(self) -> list[Manifest]:
        """This job's committed checkpoints, newest first."""
        return list_checkpoints(self.job, spec_hash=self.identity.hashes).committed

    def resume(self, state: TrainingState, at_or_before: list[int] | None = None) -> Resumed:
        """Restore ``state`` from the newest checkpoint that verifies (with ``at_or_before``, the
        newest at that training position or earlier); unchanged when there is none."""
        skipped: list[str] = []
        loaded = None
        if self.world.main:
            with self.reporter.heartbeat.keepalive(DOWNLOAD_LIMIT_S, "reading the checkpoint"):
                loaded = load_newest(self.job, spec_hash=self.identity.hashes, skipped=skipped,  # never mix specs
                                     at_or_before=at_or_before)
            for line in skipped:
                log.info("skipping checkpoint %s", line)
        chosen = distributed.broadcast(self.world, loaded.manifest.id if loaded else None)
        if chosen is not None and loaded is None:  # another rank: the same checkpoint, verified again
            manifest = next(m for m in self.committed() if m.id == chosen)
            loaded = Loaded(manifest, load(self.job, manifest), [])
        if loaded is None:
            return Resumed(None, skipped)
        if self.saver is not None:
            self.saver.verified.add(loaded.manifest.id)  # read whole: every hash matched
        snap = checkpoint_state.read_files(loaded.files)
        state.progress = checkpoint_state.restore(snap, state.model, state.optimizer, state.scheduler,
                                                  self.world.rank, state.scaler)
        if self.world.main:
            p = state.progress
            log.info("resumed from checkpoint %s (step %d, epoch %d, batch %d)", loaded.manifest.id,
                     loaded.manifest.step, p.epoch, p.batch)
        exactness = determinism.exactness(loaded.manifest.metadata.get("platform"), self.parts.platform)
        if self.world.main and exactness != determinism.BIT_FOR_BIT:
            log.warning("resuming %s, not bit for bit", exactness)
        return Resumed(loaded.manifest, skipped, exactness)

    def save(self, state: TrainingState, kind: str, plan: MemoryPlan | None, wait: bool = False) -> None:
        p = state.progress
        rng = distributed.gather(self.world, checkpoint_state.rng_capture())
        if self.saver is not None:
            # a slow store is not a hang: beat while waiting on a write, for one heartbeat timeout
            with self.reporter.heartbeat.keepalive(self.spec.run.heartbeat_timeout_s, "checkpoint write"):
                self.saver.wait()  # the host buffers are reused: the previous write must be done
                extra = {"scaler": state.scaler.state_dict()} if state.scaler.is_enabled() else {}
                snap = checkpoint_state.capture(state.model, state.optimizer, state.scheduler, p, self.host_buffers,
                                                rng, extra)
                meta = {"epoch": p.epoch, "batch": p.batch, "best_val": p.best_val, "attempt": self.attempt,
                        "data_sha256": self.identity.data_sha256, "scaling": self.parts.scaling,
                        "memory_plan": plan.to_json() if plan else None, "platform": self.parts.platform}
                if kind == "best":
                    meta["val_loss"] = p.best_val
                self.saver.submit(snap, p.global_step, kind, p.order(), meta, wait=wait)
                self.reporter.flush()
        if wait:
            distributed.barrier(self.world)
