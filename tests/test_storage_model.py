"""Storage against a model of what must survive, driven by Hypothesis (issue 23).

Rules: commits by the lease holder (each followed by retention, as the saver runs it), a writer
stalled mid-commit while the next holder takes over and commits the same id with other bytes,
late writes and deletions by a fenced writer, an import that adds a best, a flipped byte, a save
of an id that is committed already (whole, or rotten: set apart and committed again), a lease
folder deleted by hand, manifests that cannot be read (torn, by hand, from a newer version),
writes that fall short or find the disk full, and a second taker while the holder renews with a
clock that is off. On a POSIX store (faulty://) and an object store (faultymem://).

Invariants, after every rule:
- every checkpoint the model holds committed and whole is there with the very manifest and the
  bytes it was committed with: nothing committed was changed or removed, but by retention;
- retention removed nothing protected: not the newest whole step, not the whole best with the
  lowest validation loss, nothing it could not read;
- what cannot be read is there, byte for byte;
- resume picks the model's choice: the newest checkpoint that is whole.

CI runs a bounded number of examples; ``benchmarks/storage_model.py`` runs thousands, seeded.
"""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.clocks import HolderRenewsMeanwhile, ManualClock
from tests.faults.faultyfs import FAULTS, Fault
from tests.test_commit import Stalled
from timellm_job.storage import (
    AlreadyCommitted,
    StorageError,
    commit_checkpoint,
    job_store,
    list_checkpoints,
    load_newest,
)
from timellm_job.storage import lease as leases
from timellm_job.storage.checkpoints import verify
from timellm_job.storage.documents import write_json
from timellm_job.storage.layout import CHECKPOINTS, SET_APART
from timellm_job.storage.manifest import FORMAT_VERSION, MANIFEST, Manifest, parse_manifest
from timellm_job.storage.retention import clean_up
from timellm_job.trainer.saver import CheckpointSaver

# CI: 150 examples of up to 15 rules (about 20 s on the 2-core machine); benchmarks/storage_model.py: more
EXAMPLES = int(os.environ.get("TIMELLM_TEST_STORAGE_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("TIMELLM_TEST_STORAGE_MODEL_STEPS", "15"))
HASH = "h"
seeds = st.integers(0, 2**31 - 1)


def files_of(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"model.safetensors": rng.randbytes(rng.randint(64, 3000)),
            "trainer_state.json": json.dumps({"seed": seed}).encode()}


@dataclass
class Held:
    """What the model knows of one committed checkpoint."""

    manifest: Manifest
    manifest_bytes: bytes
    whole: bool = True


class _Snapshot:
    """What the saver writes: a checkpoint's files (trainer.checkpoint_state.Snapshot's one method)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def to_files(self) -> dict[str, bytes]:
        return dict(self.files)


class StorageModel(RuleBasedStateMachine):
    @initialize(kind=st.sampled_from(["faulty", "faultymem"]), limit=st.integers(1, 3))
    def open_store(self, kind, limit):
        FAULTS.clear()
        unique = uuid.uuid4().hex[:10]
        self.root = f"faulty://{TMP}/{unique}" if kind == "faulty" else f"faultymem://m-{unique}"
        self.job = job_store(self.root, "job")
        self.limit = limit
        self.holder = leases.acquire(self.job, ttl_s=60, clock=ManualClock())
        self.record_lease()
        self.verified: set[str] = set()  # what the holder's process knows whole (its saver's)
        self.held: dict[str, Held] = {}
        self.unreadable: dict[str, bytes] = {}  # folder -> its manifest's bytes
        self.step = 0

    # ------------------------------------------------------------------ helpers
    def fence(self) -> leases.Fence:
        return leases.Fence.of(self.job, self.holder)

    def record_lease(self) -> None:
        """What submit's first flush does right after it takes the lease: state.json names it."""
        write_json(self.job, "state.json", {"name": "job", "lease": {"generation": self.holder.generation}})

    def take_over(self) -> None:
        """The next runtime takes the lease (the holder's document watched for its TTL)."""
        before = max([self.holder.generation] + [h.manifest.lease_generation or 0 for h in self.held.values()])
        self.holder = leases.acquire(self.job, ttl_s=60, clock=ManualClock())
        assert self.holder.generation > before  # above every generation recorded anywhere
        self.record_lease()
        self.verified = set()

    def record(self, manifest: Manifest) -> None:
        self.held[manifest.id] = Held(manifest, self.job.read_bytes(f"{CHECKPOINTS}/{manifest.id}/{MANIFEST}"))

    def protected(self) -> set[str]:
        whole = [h.manifest for h in self.held.values() if h.whole]
        steps = sorted((m for m in whole if m.kind == "step"), key=Manifest.order, reverse=True)
        bests = sorted((m for m in whole if m.kind == "best"), key=Manifest.order, reverse=True)
        bests.sort(key=lambda m: m.val_loss)
        return {m.id for m in steps[:1] + bests[:1]}

    def retention(self) -> None:
        """As the holder's saver runs it after each of its commits."""
        protected = self.protected()
        removed = clean_up(self.job, self.limit, spec_hash=HASH, fence=self.fence(), verified=self.verified)
        for name in removed:
            assert name not in protected, f"retention removed {name}, which was protected"
            assert name not in self.unreadable, f"retention removed {name}, which it could not read"
            self.held.pop(name, None)

    def commit(self, kind: str, seed: int, val: float | None = None, fence: leases.Fence | None = None,
               store=None) -> Manifest:
        self.step += 1
        return commit_checkpoint(store or self.job, self.step, kind, files_of(seed), HASH, progress=[self.step],
                                 metadata={"val_loss": val} if val is not None else {},
                                 fence=fence or self.fence())

    # ------------------------------------------------------------------ rules
    @rule(seed=seeds)
    def commit_a_step(self, seed):
        m = self.commit("step", seed)
        self.record(m)
        self.verified.add(m.id)
        self.retention()

    @rule(seed=seeds, val=st.floats(0.01, 10.0))
    def commit_a_best(self, seed, val):
        m = self.commit("best", seed, val)
        assert verify(self.job, m) == []  # read back, as the saver does before it counts as whole
        self.record(m)
        self.verified.add(m.id)
        self.retention()

    @rule(seed=seeds, val=st.floats(0.01, 10.0))
    def import_adds_a_best(self, seed, val):
        """An import --add: committed under the job's newest generation, no retention."""
        m = self.commit("best", seed, val, fence=leases.Fence(self.job, leases.newest_generation(self.job)))
        self.record(m)

    @rule(at=st.sampled_from(["first-touch", "commit"]), seed_a=seeds, seed_b=seeds)
    def a_stalled_writer_and_a_takeover_of_the_same_id(self, at, seed_a, seed_b):
        self.step += 1
        ckpt_id, step = f"{self.step:09d}-step", self.step
        stalled = Stalled(job_store(self.root, "job"), f"{CHECKPOINTS}/{ckpt_id}", at)
        fence_a, outcome = self.fence(), []

        def writer_a():
            try:
                outcome.append(commit_checkpoint(stalled, step, "step", files_of(seed_a), HASH, progress=[step],
                                                 fence=fence_a))
            except BaseException as exc:  # noqa: BLE001 - judged below
                outcome.append(exc)

        thread = threading.Thread(target=writer_a)
        thread.start()
        assert stalled.reached.wait(30), "writer A never reached the checkpoint"
        self.take_over()
        b = commit_checkpoint(self.job, step, "step", files_of(seed_b ^ 1), HASH, progress=[step], fence=self.fence())
        stalled.go.set()
        thread.join(30)
        assert isinstance(outcome[0], (AlreadyCommitted, leases.LeaseLost)), outcome
        self.record(b)
        self.verified.add(b.id)
        self.retention()

    @rule(seed=seeds)
    def a_fenced_writer_commits_and_deletes_nothing(self, seed):
        old = self.fence()
        self.take_over()
        with pytest.raises(leases.LeaseLost):
            self.commit("step", seed, fence=old)
        with pytest.raises(leases.LeaseLost):
            clean_up(self.job, 1, spec_hash=HASH, fence=old)

    @precondition(lambda self: any(h.whole for h in self.held.values()))
    @rule(data=st.data())
    def a_byte_flips(self, data):
        name = data.draw(st.sampled_from(sorted(i for i, h in self.held.items() if h.whole)))
        path = f"{self.held[name].manifest.data_folder(CHECKPOINTS)}/model.safetensors"
        raw = bytearray(self.job.read_bytes(path))
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0x01
        self.job.replace(path, bytes(raw))
        self.held[name].whole = False

    @precondition(lambda self: any(h.manifest.kind == "step" for h in self.held.values()))
    @rule(data=st.data(), seed=seeds)
    def a_save_of_an_id_committed_already(self, data, seed):
        """Whole: kept as it is. Rotten: set apart (never deleted) and committed again."""
        name = data.draw(st.sampled_from(sorted(i for i, h in self.held.items() if h.manifest.kind == "step")))
        m = self.held[name].manifest
        saver = CheckpointSaver(self.job, HASH, self.limit, background=False, fence=self.fence(), retention=False)
        aside = len(self.job.list_dir(SET_APART))
        saver.submit(_Snapshot(files_of(seed)), m.step, m.kind, list(m.progress), {}, wait=True)
        if self.held[name].whole:
            assert self.job.read_bytes(f"{CHECKPOINTS}/{name}/{MANIFEST}") == self.held[name].manifest_bytes
        else:
            assert len(self.job.list_dir(SET_APART)) > aside  # the rotten one kept, moved aside
            self.record(parse_manifest(self.job.read_bytes(f"{CHECKPOINTS}/{name}/{MANIFEST}")))
        self.verified.add(name)
        self.retention()

    @rule()
    def the_lease_folder_is_deleted_by_hand(self):
        self.job.remove("lease", recursive=True)
        self.take_over()

    @rule(what=st.sampled_from(["torn", "by-hand", "newer-format", "unknown-kind"]))
    def a_manifest_that_cannot_be_read(self, what):
        self.step += 1
        doc = {"format_version": 1, "id": f"{self.step:09d}-step", "step": self.step, "kind": "step",
               "created_at": 0, "spec_hash": HASH, "progress": [self.step], "files": {}}
        data = {"torn": json.dumps(doc).encode()[:40], "by-hand": b"copied from the other VM",
                "newer-format": json.dumps({**doc, "format_version": FORMAT_VERSION + 1}).encode(),
                "unknown-kind": json.dumps({**doc, "kind": "ema"}).encode()}[what]
        folder = f"{self.step:09d}-step"
        self.job.replace(f"{CHECKPOINTS}/{folder}/{MANIFEST}", data)
        self.unreadable[folder] = data

    @rule(kind=st.sampled_from(["short", "drop", "enospc"]), seed=seeds)
    def a_write_that_falls_short(self, kind, seed):
        FAULTS.append(Fault("write", kind, match="model.safetensors", limit=50))
        try:
            with pytest.raises(StorageError):
                self.commit("step", seed)
        finally:
            FAULTS.clear()
        assert f"{self.step:09d}-step" not in list_checkpoints(self.job).uncommitted  # it removed what it wrote

    @rule(offset=st.sampled_from([-3600.0, -120.0, 120.0, 3600.0]))
    def a_second_taker_while_the_holder_renews(self, offset):
        """Whichever clock is off, and by how much, a holder that renews is never taken over."""
        clock = HolderRenewsMeanwhile(self.job, self.holder, 60.0, holder_offset_s=offset)
        with pytest.raises(leases.LeaseHeld):
            leases.acquire(self.job, ttl_s=60, clock=clock)
        leases.check(self.job, self.holder.generation, self.holder.owner)  # still the holder

    # ------------------------------------------------------------------ invariants
    @invariant()
    def nothing_committed_was_changed_or_removed(self):
        if not hasattr(self, "job"):
            return
        listing = list_checkpoints(self.job)
        present = {m.id: m for m in listing.committed}
        for name, held in self.held.items():
            assert name in present, f"{name} was committed and is gone"
            if held.whole:
                assert self.job.read_bytes(f"{CHECKPOINTS}/{name}/{MANIFEST}") == held.manifest_bytes, name
                assert verify(self.job, present[name]) == [], name
        for folder, data in self.unreadable.items():
            assert self.job.read_bytes(f"{CHECKPOINTS}/{folder}/{MANIFEST}") == data, folder
            assert folder in listing.unreadable

    @invariant()
    def resume_picks_the_newest_whole_checkpoint(self):
        if not hasattr(self, "job"):
            return
        whole = [h.manifest for h in self.held.values() if h.whole]
        expected = max(whole, key=Manifest.order).id if whole else None
        loaded = load_newest(self.job, spec_hash=HASH)
        assert (loaded.manifest.id if loaded else None) == expected


TMP = ""


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    global TMP
    TMP = str(tmp_path)
    yield
    FAULTS.clear()


StorageModel.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
test_storage_against_its_model = StorageModel.TestCase
