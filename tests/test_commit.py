"""The commit protocol's invariants, on every backend (local, memory, GCS emulator, S3/moto)."""

from __future__ import annotations

import hashlib
import os

import pytest

from storage import AlreadyCommitted, commit_checkpoint, job_store, list_checkpoints, load, load_newest
from storage.checkpoints import CorruptCheckpoint, verify
from storage.layout import CHECKPOINTS
from storage.manifest import MANIFEST

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
    assert m.kind == "step" and m.step == 20 and m.format_version == 1 and m.spec_hash == "h" * 64
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
    path = f"{CHECKPOINTS}/{newer.id}/model.safetensors"
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
    import storage.store as store_module

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
    job.remove(f"{CHECKPOINTS}/{mine.id}/state.json")
    skipped.clear()
    assert load_newest(job, spec_hash="mine", skipped=skipped) is None
    assert len(skipped) == 2 and "state.json: missing" in skipped[1]


def test_each_kind_of_store_has_one_backend_with_its_commit_strategy(tmp_path, backend):
    """storage.backends decides, once per store, how it creates, replaces and commits: POSIX
    renames a temporary folder, object stores commit a create-only manifest, and a store whose
    create is fsspec's exists-then-write says it is not create-only (the lease cannot rely on it)."""
    from storage.commit_strategy import strategy_for

    job = _job(backend)
    local = "://" not in backend[0]
    assert job.is_local == local and job.backend.kind == ("posix" if local else "object-store")
    assert strategy_for(job).name == ("rename-folder" if local else "create-only-manifest")
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
