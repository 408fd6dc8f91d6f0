"""Retention keeps the newest step checkpoints, the best and the newest preempt; it deletes only
older ones, never what it cannot read, and of leftovers only our own."""

from __future__ import annotations

import json

import pytest

from tests.jobfiles import file_of
from timellm_job.storage import commit_checkpoint, job_store, list_checkpoints, load_newest
from timellm_job.storage.layout import CHECKPOINTS
from timellm_job.storage.manifest import FORMAT_VERSION, MANIFEST
from timellm_job.storage.retention import clean_up, delete_checkpoint, leftovers

FILES = {"model.safetensors": b"w" * 100}


def _ids(job):
    return [m.id for m in list_checkpoints(job).committed]


def test_keeps_limit_newest_steps_plus_best_plus_newest_preempt(backend):
    job = job_store(backend[0], "job", backend[1])
    commit_checkpoint(job, 10, "best", FILES, "x")
    commit_checkpoint(job, 15, "preempt", FILES, "x")
    for step in (20, 40, 60, 80):
        commit_checkpoint(job, step, "step", FILES, "x")
    commit_checkpoint(job, 85, "preempt", FILES, "x")
    removed = clean_up(job, save_total_limit=2)
    assert sorted(removed) == ["000000015-preempt", "000000020-step", "000000040-step"]
    assert _ids(job) == ["000000085-preempt", "000000080-step", "000000060-step", "000000010-best"]


def test_a_torn_newest_step_does_not_cost_the_older_whole_ones(backend):
    job = job_store(backend[0], "job", backend[1])
    for step in (20, 40, 60):
        commit_checkpoint(job, step, "step", FILES, "x")
    job.replace(file_of(job, "000000060-step", "model.safetensors"), b"short")  # a lagging upload
    clean_up(job, save_total_limit=2)
    # 60 is torn but newer than all kept: left alone; 40 and 20 are the two whole newest
    assert _ids(job) == ["000000060-step", "000000040-step", "000000020-step"]


def test_half_deleted_checkpoint_is_uncommitted_and_cleaned(backend):
    """Object stores delete the manifest first: a crash between the two steps leaves a writer's
    prefix without a manifest, which is ours and cleaned. POSIX deletes by renaming the folder
    aside first: a crash leaves a .tmp- folder, never a torn one under the checkpoint's name."""
    job = job_store(backend[0], "job", backend[1])
    commit_checkpoint(job, 20, "step", FILES, "x")
    commit_checkpoint(job, 40, "step", FILES, "x")
    if job.backend.renames_folders:
        job.rename_dir(f"{CHECKPOINTS}/000000020-step", f"{CHECKPOINTS}/.tmp-deleted-000000020-step-abcd1234")
        expected = ".tmp-deleted-000000020-step-abcd1234"
    else:
        job.remove(f"{CHECKPOINTS}/000000020-step/manifest.json")  # a crash between the two deletion steps
        expected = "000000020-step/"
    assert _ids(job) == ["000000040-step"]
    assert any(r.startswith(expected) for r in clean_up(job, save_total_limit=2))
    assert list_checkpoints(job).uncommitted == []
    delete_checkpoint(job, "000000040-step")
    assert _ids(job) == [] and job.list_dir(CHECKPOINTS) == []


def test_a_folder_without_manifest_under_a_checkpoints_name_is_never_removed_on_posix(tmp_path):
    """On Drive a committed folder can arrive before its manifest: under a checkpoint's name it
    is not ours to remove (it is never loaded either)."""
    job = job_store(str(tmp_path), "job")
    job.write_file(f"{CHECKPOINTS}/000000060-step/model.safetensors", b"arriving")
    assert clean_up(job, save_total_limit=1) == []
    assert job.read_bytes(f"{CHECKPOINTS}/000000060-step/model.safetensors") == b"arriving"
    assert load_newest(job) is None


def _copy_folder(job, src: str, dst: str) -> None:
    for name, kind, _ in job.list_dir(f"{CHECKPOINTS}/{src}"):
        if kind == "directory":
            _copy_folder(job, f"{src}/{name}", f"{dst}/{name}")
        else:
            job.replace(f"{CHECKPOINTS}/{dst}/{name}", job.read_bytes(f"{CHECKPOINTS}/{src}/{name}"))


def test_another_specs_checkpoint_and_a_copied_folder_are_set_apart_everywhere(backend):
    """Reproduced before: a newer checkpoint of another spec made retention delete the job's own
    just-committed best and step. One view now sets both kinds apart, for every reader."""
    from timellm_job.storage import load_newest

    job = job_store(backend[0], "job", backend[1])
    commit_checkpoint(job, 900, "step", FILES, "another-spec")  # e.g. an import into the wrong job
    commit_checkpoint(job, 10, "best", FILES, "mine")
    commit_checkpoint(job, 20, "step", FILES, "mine")
    _copy_folder(job, "000000020-step", "000000950-step")  # a copied folder: its manifest says 20
    removed = clean_up(job, save_total_limit=1, spec_hash="mine")
    assert removed == []  # nothing of the job's is lost, nothing set apart is touched
    listing = list_checkpoints(job, spec_hash="mine")
    assert [m.id for m in listing.committed] == ["000000020-step", "000000010-best"]
    assert listing.set_apart == {"000000900-step": "written for another spec",
                                 "000000950-step": "its manifest names checkpoint 000000020-step (a copied folder)"}
    skipped: list[str] = []
    assert load_newest(job, spec_hash="mine", skipped=skipped).manifest.id == "000000020-step"
    assert len(skipped) == 2  # reported, never loaded
    commit_checkpoint(job, 30, "step", FILES, "mine")
    clean_up(job, save_total_limit=1, spec_hash="mine")
    assert [m.id for m in list_checkpoints(job, spec_hash="mine").committed] == ["000000030-step", "000000010-best"]
    assert set(list_checkpoints(job, spec_hash="mine").set_apart) == {"000000900-step", "000000950-step"}


def test_right_sized_but_wrong_bytes_never_cost_the_last_checkpoint_known_whole(backend):
    """Issue 15: retention judged wholeness by sizes. Two newer step checkpoints whose files have
    the right length but not the right bytes (a zero-filled write after a crash) passed that check,
    and the only whole one was deleted: nothing was left to resume from. Checkpoints known whole
    by hash (committed by this process, or read back and verified) are kept whatever sizes say."""
    from timellm_job.storage import load_newest

    job = job_store(backend[0], "job", backend[1])
    good = commit_checkpoint(job, 20, "step", FILES, "x")
    for step in (40, 60):
        commit_checkpoint(job, step, "step", FILES, "x")
        job.replace(file_of(job, f"{step:09d}-step", "model.safetensors"), b"\0" * 100)  # right size, wrong bytes
    clean_up(job, save_total_limit=2, spec_hash="x", verified={good.id})
    assert good.id in _ids(job)
    assert load_newest(job, spec_hash="x").manifest.id == good.id
    clean_up(job, save_total_limit=2, spec_hash="x")  # judged by sizes alone, as before: lost
    assert good.id not in _ids(job) and load_newest(job, spec_hash="x") is None


@pytest.mark.parametrize("what", ["torn", "newer-format", "unknown-kind", "by-hand"])
def test_what_cannot_be_read_is_never_deleted(backend, what):
    """Issue 23, item 5: retention deleted every checkpoint whose manifest it could not parse,
    the newest included: one written by a newer timellm-job, or still arriving on Drive. Now it
    stays, byte for byte, reported as unreadable and skipped by every reader."""
    job = job_store(backend[0], "job", backend[1])
    for step in (20, 40, 60):
        commit_checkpoint(job, step, "step", FILES, "x")
    doc = json.loads(job.read_bytes(f"{CHECKPOINTS}/000000060-step/{MANIFEST}"))
    strange = {"torn": b'{"format_version": 1, "id": "000000080-st',
               "newer-format": json.dumps({**doc, "id": "000000080-ema", "format_version": FORMAT_VERSION + 1,
                                           "kind": "ema"}).encode(),
               "unknown-kind": json.dumps({**doc, "id": "000000080-ema", "kind": "ema"}).encode(),
               "by-hand": b"checkpoint of step 80, copied from the other VM"}[what]
    folder = "000000080-ema" if what in ("newer-format", "unknown-kind") else "000000080-step"
    job.replace(f"{CHECKPOINTS}/{folder}/{MANIFEST}", strange)
    job.replace(f"{CHECKPOINTS}/{folder}/model.safetensors", b"w" * 100)
    for _ in range(2):
        clean_up(job, save_total_limit=1, spec_hash="x")
    assert job.read_bytes(f"{CHECKPOINTS}/{folder}/{MANIFEST}") == strange
    assert job.read_bytes(f"{CHECKPOINTS}/{folder}/model.safetensors") == b"w" * 100
    listing = list_checkpoints(job, spec_hash="x")
    assert list(listing.unreadable) == [folder] and _ids(job) == ["000000060-step"]
    skipped: list[str] = []
    assert load_newest(job, spec_hash="x", skipped=skipped).manifest.id == "000000060-step"
    assert skipped and skipped[0].startswith(folder)


def _best(job, step: int, val: float):
    return commit_checkpoint(job, step, "best", FILES, "x", metadata={"val_loss": val})


def test_the_best_is_the_lowest_validation_loss_never_the_newest_arrival(backend):
    """Issue 23, item 2: an imported run whose best has validation loss 9.9, committed after the
    job's own best of 0.466, made retention delete the job's. The best is the lowest loss."""
    job = job_store(backend[0], "job", backend[1])
    own = _best(job, 100, 0.466)
    imported = _best(job, 900, 9.9)
    for verified in (set(), {imported.id}, {own.id}, {own.id, imported.id}):
        clean_up(job, save_total_limit=1, spec_hash="x", verified=verified)
        assert own.id in _ids(job)
    assert _ids(job) == [own.id]  # once the job's own best is known whole, the worse one goes


def test_the_previous_best_stays_until_a_better_one_has_verified(backend):
    job = job_store(backend[0], "job", backend[1])
    previous = _best(job, 100, 0.5)
    newer = _best(job, 200, 0.4)
    clean_up(job, save_total_limit=1, spec_hash="x", verified={previous.id})  # the newer not known whole
    assert _ids(job) == [newer.id, previous.id]
    clean_up(job, save_total_limit=1, spec_hash="x", verified={previous.id, newer.id})
    assert _ids(job) == [newer.id]


def test_the_checkpoint_results_name_is_never_deleted(backend):
    """results.json names the best its test metrics came from: it stays while they do."""
    from timellm_job.storage.documents import write_json

    job = job_store(backend[0], "job", backend[1])
    tested = _best(job, 100, 0.5)
    better = _best(job, 200, 0.4)  # e.g. added later by an import --add
    write_json(job, "results.json", {"best_checkpoint": tested.id})
    clean_up(job, save_total_limit=1, spec_hash="x", verified={better.id})
    assert _ids(job) == [better.id, tested.id]


def test_leftovers_of_a_newer_generation_are_never_removed(backend):
    """A cleaner fenced out by a newer holder (stalled between its fence check and its removals)
    removes no temporary place of that holder: only writers of its own generation or older."""
    job = job_store(backend[0], "job", backend[1])
    if job.backend.renames_folders:
        for gen in (2, 3, 5):
            job.write_file(f"{CHECKPOINTS}/.tmp-000000040-step-w{gen:010d}-abcd1234/model.safetensors", b"x")
    else:
        for gen in (2, 3, 5):
            job.write_file(f"{CHECKPOINTS}/000000040-step/w{gen:010d}-abcd1234/model.safetensors", b"x")
    found = leftovers(job, list_checkpoints(job), generation=3)
    assert sorted(f.rsplit("-w", 1)[1][:10] if "/.tmp-" in f else f.rsplit("/w", 1)[1][:10] for f in found) == \
        ["0000000002", "0000000003"]
