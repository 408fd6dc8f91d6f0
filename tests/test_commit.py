"""The commit protocol's invariants, on every backend (local, memory, GCS emulator, S3/moto)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from tests.faults.faultyfs import FAULTS, Fault
from timellm_job.storage import (
    AlreadyCommitted,
    StorageError,
    commit_checkpoint,
    job_store,
    list_checkpoints,
    load,
    load_newest,
)
from timellm_job.storage import lease as leases
from timellm_job.storage.checkpoints import CorruptCheckpoint, verify
from timellm_job.storage.layout import CHECKPOINTS
from timellm_job.storage.manifest import MANIFEST

FILES = {"model.safetensors": os.urandom(3000), "state.json": b'{"epoch": 1}'}


def _job(backend):
    root, options = backend
    return job_store(root, "job", options)


def test_manifest_lists_every_file_with_size_and_sha256(backend):
    job = _job(backend)
    m = commit_checkpoint(job, 20, "step", FILES, spec_hash="h" * 64)
    assert set(m.files) == set(FILES)
    for name, data in FILES.items():
        assert m.files[name].size == len(data)
        assert m.files[name].sha256 == hashlib.sha256(data).hexdigest()
    assert m.kind == "step" and m.step == 20 and m.spec_hash == "h" * 64
    # POSIX: the files in the checkpoint's own folder (format 1); object stores: under the
    # writer's own prefix, which the manifest names (format 2)
    assert (m.format_version, m.data_dir == "") == ((1, True) if job.backend.renames_folders else (2, False))
    assert load(job, m) == FILES


def test_nothing_committed_is_rewritten(backend):
    job = _job(backend)
    m = commit_checkpoint(job, 20, "step", FILES, spec_hash="x")
    with pytest.raises(AlreadyCommitted):
        commit_checkpoint(job, 20, "step", {"model.safetensors": b"other"}, spec_hash="x")
    assert load(job, m) == FILES


def test_manifest_exists_only_over_complete_files_after_a_torn_write(backend):
    """A write that dies before its manifest leaves something that is never listed or loaded."""
    job = _job(backend)
    good = commit_checkpoint(job, 20, "step", FILES, spec_hash="x")
    # the state a crash mid-write leaves: data files, no manifest
    job.write_file(f"{CHECKPOINTS}/000000040-step/model.safetensors", b"partial")
    job.write_file(f"{CHECKPOINTS}/.tmp-000000060-step-abcd/model.safetensors", b"partial")
    listing = list_checkpoints(job)
    assert [m.id for m in listing.committed] == [good.id]
    assert sorted(listing.uncommitted) == [".tmp-000000060-step-abcd", "000000040-step"]
    loaded = load_newest(job)
    assert loaded.manifest.id == good.id and loaded.skipped == []
    # the same id can then be committed over the leftovers, holding exactly its own files
    m40 = commit_checkpoint(job, 40, "step", FILES, spec_hash="x")
    assert load(job, m40) == FILES
    assert load_newest(job).manifest.id == m40.id


@pytest.mark.parametrize("fault", ["truncate", "flip", "delete", "extra-manifest-garbage"])
def test_corruption_is_detected_and_the_next_newest_is_loaded(backend, fault):
    job = _job(backend)
    older = commit_checkpoint(job, 20, "step", FILES, spec_hash="x")
    newer = commit_checkpoint(job, 40, "step", FILES, spec_hash="x")
    path = f"{newer.data_folder(CHECKPOINTS)}/model.safetensors"
    data = FILES["model.safetensors"]
    if fault == "truncate":
        job.replace(path, data[:-10])
    elif fault == "flip":
        job.replace(path, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif fault == "delete":
        job.remove(path)
    else:
        job.replace(f"{CHECKPOINTS}/{newer.id}/{MANIFEST}", b"{not json")
    if fault != "extra-manifest-garbage":
        assert verify(job, newer)
        with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
            load(job, newer)
    loaded = load_newest(job)
    assert loaded.manifest.id == older.id and loaded.files == FILES
    if fault != "extra-manifest-garbage":
        assert loaded.skipped and loaded.skipped[0].startswith(newer.id)
    assert verify(job, older) == []


def test_local_commit_leaves_no_temporary_folder(tmp_path):
    job = job_store(str(tmp_path), "job")
    commit_checkpoint(job, 1, "best", FILES, spec_hash="x")
    assert sorted(os.listdir(tmp_path / "job" / CHECKPOINTS)) == ["000000001-best"]
    assert sorted(os.listdir(tmp_path / "job" / CHECKPOINTS / "000000001-best")) == sorted([*FILES, MANIFEST])


def test_a_copy_committed_without_durability_skips_only_the_file_fsyncs(tmp_path, monkeypatch):
    """durable=False (a machine's copy of the backbone cache): no file is fsynced, the folder
    still appears by one rename and verifies; a checkpoint (the default) fsyncs every file."""
    import timellm_job.storage.store as store_module

    synced = []
    real = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    job = job_store(str(tmp_path), "job")
    copy = commit_checkpoint(job, 0, "backbone", FILES, spec_hash="x", ckpt_id="key", base="backbone", durable=False)
    files_synced = len(synced)
    assert load(job, copy, base="backbone") == FILES
    assert sorted(os.listdir(tmp_path / "job" / "backbone")) == ["key"]
    synced.clear()
    commit_checkpoint(job, 1, "step", FILES, spec_hash="x")
    assert files_synced == 1  # the folder's rename alone
    assert len(synced) == len(FILES) + 1 + 1  # every file, the manifest, the folder's rename


def test_newest_is_ordered_by_progress_not_name(backend):
    job = _job(backend)
    commit_checkpoint(job, 40, "step", FILES, spec_hash="x", progress=[40, 0])
    commit_checkpoint(job, 40, "best", FILES, spec_hash="x", progress=[40, 1])
    commit_checkpoint(job, 30, "preempt", FILES, spec_hash="x", progress=[30, 0])
    assert [m.id for m in list_checkpoints(job).committed] == ["000000040-best", "000000040-step", "000000030-preempt"]


def test_load_newest_passes_over_other_specs_and_reports_every_skip(backend):
    job = _job(backend)
    mine = commit_checkpoint(job, 10, "step", FILES, spec_hash="mine")
    commit_checkpoint(job, 20, "step", FILES, spec_hash="other")
    skipped: list[str] = []
    loaded = load_newest(job, spec_hash="mine", skipped=skipped)
    assert loaded.manifest.id == mine.id and skipped == ["000000020-step: written for another spec"]
    job.remove(f"{mine.data_folder(CHECKPOINTS)}/state.json")
    skipped.clear()
    assert load_newest(job, spec_hash="mine", skipped=skipped) is None
    assert len(skipped) == 2 and "state.json: missing" in skipped[1]


def test_each_kind_of_store_has_one_backend_with_its_commit_strategy(tmp_path, backend):
    """storage.backends says, once per store, what it can do (create, replace, rename a folder);
    storage.commit_strategy chooses from that: POSIX renames a private folder, object stores
    commit a create-only manifest over the writer's prefix, and a store whose create is fsspec's
    exists-then-write says it is not create-only (the lease cannot rely on it)."""
    from timellm_job.storage.commit_strategy import strategy_for

    job = _job(backend)
    local = "://" not in backend[0]
    assert job.is_local == local and job.backend.kind == ("posix" if local else "object-store")
    assert strategy_for(job).name == ("rename-folder" if local else "writer-prefix")
    assert job.backend.create_only and strategy_for(job).create_only
    job.create("a/created", b"1")
    if not backend[0].startswith("gs://"):  # the GCS emulator ignores preconditions (real GCS does not)
        with pytest.raises(FileExistsError):
            job.create("a/created", b"2")
    job.replace("a/created", b"3")
    assert job.read_bytes("a/created") == b"3"
    generic = job_store("dir://shared", "job", {"path": str(tmp_path), "target_protocol": "file"})
    assert generic.backend.kind == "object-store" and not generic.backend.create_only
    assert not strategy_for(generic).create_only


def test_backends_name_no_commit_strategy():
    """storage one way: the backends expose capabilities and never import the strategies that
    are chosen above them (no circle, TYPE_CHECKING included)."""
    from timellm_job.storage import backends

    source = open(backends.__file__).read()
    assert "commit_strategy" not in source.replace("(storage.commit_strategy)", "")
    assert "TYPE_CHECKING" not in source


class Stalled:
    """A writer's Store that stops at its first call touching ``final`` (``at="first-touch"``:
    writing or removing anything there) or at its commit point (``at="commit"``: the rename or
    the create-only manifest, after the fence check it passed), until ``go`` is set: a VM
    frozen mid-commit, a store that stopped answering."""

    def __init__(self, store, final: str, at: str):
        self._store, self._final, self._at = store, final, at
        self.reached, self.go = threading.Event(), threading.Event()

    def _gate(self, method: str, *paths: str) -> None:
        if self._at == "commit" and method not in ("rename_dir", "create"):
            return
        if not self.reached.is_set() and any(p == self._final or p.startswith(self._final + "/") for p in paths):
            self.reached.set()
            self.go.wait(60)

    def write_file(self, rel, *a, **k):
        self._gate("write_file", rel)
        return self._store.write_file(rel, *a, **k)

    def remove(self, rel, *a, **k):
        self._gate("remove", rel)
        return self._store.remove(rel, *a, **k)

    def rename_dir(self, src, dst):
        self._gate("rename_dir", src, dst)
        return self._store.rename_dir(src, dst)

    def create(self, rel, *a, **k):
        self._gate("create", rel)
        return self._store.create(rel, *a, **k)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.parametrize("at", ["first-touch", "commit"])
def test_a_stalled_writer_never_touches_the_new_holders_checkpoint(backend, at):
    """Writer A stalls mid-commit (at its first write or removal under the checkpoint's name, or
    at its commit point after passing its fence check); its lease lapses, B takes the next
    generation and commits the same id with other bytes (as on a GPU, where two runs differ);
    A wakes. B's checkpoint is exactly B's: every file verifies and holds B's bytes, and A left
    nothing. (Failed before: on object stores A removed the final prefix and wrote its files into
    B's committed folder; on POSIX it removed B's folder before its rename.)"""
    root, options = backend
    if at == "commit" and root.startswith("gs://"):
        pytest.skip("the GCS emulator ignores ifGenerationMatch=0, which real GCS honours")
    job = job_store(root, "job", options)
    first = leases.acquire(job, ttl_s=0.3)
    final = f"{CHECKPOINTS}/000000040-step"
    writer_a = Stalled(job_store(root, "job", options), final, at)
    a_bytes = {"model.safetensors": os.urandom(3000), "state.json": b'{"writer": "a"}'}
    b_bytes = {"model.safetensors": os.urandom(3000), "state.json": b'{"writer": "b"}'}
    outcome: list = []

    def run_a():
        try:
            outcome.append(commit_checkpoint(writer_a, 40, "step", a_bytes, "x",
                                             fence=leases.Fence.of(job, first)))
        except BaseException as exc:  # noqa: BLE001 - judged below
            outcome.append(exc)

    thread = threading.Thread(target=run_a)
    thread.start()
    assert writer_a.reached.wait(30)
    second = leases.acquire(job, ttl_s=60)  # A's document stays unchanged for its TTL: taken over
    assert second.generation == first.generation + 1
    b = commit_checkpoint(job, 40, "step", b_bytes, "x", fence=leases.Fence.of(job, second))
    writer_a.go.set()
    thread.join(30)
    assert isinstance(outcome[0], (AlreadyCommitted, leases.LeaseLost)), outcome
    listing = list_checkpoints(job)
    assert [m.id for m in listing.committed] == [b.id] and listing.committed[0].lease_generation == second.generation
    assert verify(job, b) == [] and load(job, b) == b_bytes
    leftovers = [n for n in listing.uncommitted]
    if not job.backend.renames_folders:
        leftovers += [n for n, _, _ in job.list_dir(final) if n not in (MANIFEST, b.data_dir)]
    assert leftovers == []  # A's commit failed: it removed what it wrote, and nothing else


@pytest.fixture(params=["faulty", "faultymem"])
def faulty_job(request, tmp_path):
    FAULTS.clear()
    root = f"faulty://{tmp_path}/root" if request.param == "faulty" else f"faultymem://t-{os.urandom(4).hex()}"
    yield job_store(root, "job")
    FAULTS.clear()


@pytest.mark.parametrize("kind", ["drop", "short", "enospc"])
def test_a_short_write_is_an_error_and_commits_nothing(faulty_job, kind):
    """A disk that fills: a write that keeps fewer bytes than it reports (drop), one that takes
    part and then nothing (short), one that says ENOSPC. No manifest is written over what did
    not reach the store, the earlier checkpoint stays whole, and the failed commit left nothing.
    (Failed before on POSIX: the unbuffered write's count was never checked.)"""
    job = faulty_job
    good = commit_checkpoint(job, 10, "step", FILES, "x")
    FAULTS.append(Fault("write", kind, match="model.safetensors", limit=1000))
    with pytest.raises(StorageError, match="short write|accepted 0|[Nn]o space left"):
        commit_checkpoint(job, 20, "step", FILES, "x")
    FAULTS.clear()
    listing = list_checkpoints(job)
    assert [m.id for m in listing.committed] == [good.id] and load(job, good) == FILES
    assert listing.uncommitted == [] and [n for n, _, _ in job.list_dir(CHECKPOINTS)] == [good.id]


def test_a_fenced_commit_removes_what_it_wrote(faulty_job):
    job = faulty_job
    old = leases.acquire(job, ttl_s=0.2)
    leases.acquire(job, ttl_s=60)
    with pytest.raises(leases.LeaseLost):
        commit_checkpoint(job, 20, "step", FILES, "x", fence=leases.Fence(job, old.generation))
    assert [n for n, _, _ in job.list_dir(CHECKPOINTS)] == []


def test_a_torn_read_is_never_loaded(faulty_job):
    job = faulty_job
    older = commit_checkpoint(job, 10, "step", FILES, "x")
    newer = commit_checkpoint(job, 20, "step", FILES, "x")
    FAULTS.append(Fault("read", "torn", match=f"{newer.id}/", limit=100))
    loaded = load_newest(job)
    assert loaded.manifest.id == older.id and loaded.files == FILES
    assert loaded.skipped and loaded.skipped[0].startswith(newer.id)
