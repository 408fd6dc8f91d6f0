"""Storage faults: transient errors retried, permanent ones fail at once naming the URL,
ENOSPC mid-write loses nothing committed, names cannot escape the root."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from tests import servers
from tests.faulty_proxy import FaultyProxy
from timellm_job.storage import (
    StorageError,
    commit_checkpoint,
    job_store,
    list_checkpoints,
    load,
    load_newest,
)
from timellm_job.storage.retry import call, is_transient

FILES = {"model.safetensors": os.urandom(200_000), "state.json": b"{}"}


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_transient_gcs_errors_are_retried_and_commits_stay_whole(gcs_server, mode):
    proxy = FaultyProxy(gcs_server.url, every=3, mode=mode)
    try:
        job = job_store(f"gs://{servers.GCS_BUCKET}/faults-{uuid.uuid4().hex[:8]}", "job",
                        {"token": "anon", "endpoint_url": proxy.url})
        m1 = commit_checkpoint(job, 10, "step", FILES, "x")
        m2 = commit_checkpoint(job, 20, "step", FILES, "x")
        assert load(job, m1) == FILES
        assert load_newest(job).manifest.id == m2.id
        assert proxy.failed >= 3  # faults really were injected
    finally:
        proxy.stop()


def test_transient_classification():
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert not is_transient(OSError(errno.ENOSPC, "full"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("x"))

    class Http(Exception):
        def __init__(self, code):
            self.code = code

    assert is_transient(Http(503)) and is_transient(Http(429))
    assert not is_transient(Http(403)) and not is_transient(Http(404))


def test_transient_then_success_is_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert call(flaky, "gs://b/x", "reading", total_s=10) == "ok" and len(calls) == 3


def test_permanent_error_fails_at_once_naming_the_url():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(StorageError, match="gs://b/x.*permission denied"):
        call(denied, "gs://b/x", "writing")
    assert len(calls) == 1


def test_missing_s3_bucket_is_a_clear_error(s3_server):
    job = job_store("s3://no-such-bucket-here/root", "job", servers.s3_options(s3_server))
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/root/job"):
        commit_checkpoint(job, 1, "step", FILES, "x")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden"])
def test_job_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(StorageError):
        job_store(str(tmp_path), name)


def test_paths_cannot_escape_a_store(tmp_path):
    job = job_store(str(tmp_path), "job")
    with pytest.raises(StorageError):
        job.write_file("../evil", b"x")


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_enospc_mid_write_fails_clearly_and_loses_nothing(tiny_disk):
    job = job_store(str(tiny_disk), "job")
    small = {"model.safetensors": os.urandom(100_000)}
    good = commit_checkpoint(job, 10, "step", small, "x")
    with pytest.raises(StorageError, match="no space left"):
        commit_checkpoint(job, 20, "step", {"model.safetensors": os.urandom(2_000_000)}, "x")
    assert [m.id for m in list_checkpoints(job).committed] == [good.id]
    assert load(job, good) == small


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_an_object_written_by_another_process_after_a_listing_is_never_hidden(kind, request):
    """s3fs and gcsfs answer exists and cat_file from a listing cached earlier: a manifest that
    another process committed after this one listed the folder read as missing (found by the
    stalled-writer test, issue 23). Every read asks the store."""
    server = request.getfixturevalue(f"{kind}_server")
    unique = uuid.uuid4().hex[:8]
    if kind == "s3":
        root, options = f"s3://{servers.S3_BUCKET}/cache-{unique}", servers.s3_options(server)
    else:
        root, options = f"gs://{servers.GCS_BUCKET}/cache-{unique}", servers.gcs_options(server)
    mine = job_store(root, "job", options)
    mine.write_file("checkpoints/x/w1/model.safetensors", b"1")
    assert [n for n, _, _ in mine.list_dir("checkpoints/x")] == ["w1"]  # the listing is cached now
    import fsspec

    theirs, _ = fsspec.core.url_to_fs(root, skip_instance_cache=True, **options)
    theirs.pipe_file(mine.full("checkpoints/x/manifest.json"), b"{}")  # another process commits
    assert mine.exists("checkpoints/x/manifest.json")
    assert mine.read_bytes("checkpoints/x/manifest.json") == b"{}"


def test_a_job_that_would_not_fit_the_disk_is_refused_naming_save_total_limit(tiny_disk, tmp_path):
    """Issue 23, item 16: a store that will not hold the job was found out hours in. submit
    estimates the backbone cache and the checkpoints the job will hold and compares them with the
    free space the disk reports; --allow-low-space goes on, and when the disk then fills, the
    attempt says so in plain words."""
    from tests.cli import run, state
    from tests.jobfiles import quick_spec

    spec = quick_spec(tmp_path, storage={"root": str(tiny_disk / "root")},
                      run={"max_restarts": 1, "crash_loop_limit": 2})
    refused = run(tmp_path, "submit", str(spec), timeout=300)
    assert refused.returncode == 2 and "storage.save_total_limit" in refused.stderr, refused.stderr
    assert "GB are free" in refused.stderr and not (tiny_disk / "root").exists()
    went_on = run(tmp_path, "submit", str(spec), "--allow-low-space", timeout=600)
    assert went_on.returncode == 1, went_on.stderr
    reasons = [a["reason"] for a in state(tiny_disk / "root" / "quick")["attempts"]]
    assert reasons and all("the store is full" in r for r in reasons), reasons


def test_one_classifier_for_the_store_and_the_model_hub():
    """Issue 24: the hub's downloads and the store's calls had a classifier each; one is left.
    The hub's own exceptions are judged by name (huggingface_hub is not imported to ask)."""

    def named(name, base=Exception, **attrs):
        return type(name, (base,), attrs)("x")

    class Response:
        def __init__(self, status_code):
            self.status_code = status_code

    assert not is_transient(named("RepositoryNotFoundError")) and not is_transient(named("GatedRepoError"))
    assert is_transient(named("LocalEntryNotFoundError", FileNotFoundError))  # offline, not missing
    assert is_transient(named("ReadTimeout")) and is_transient(named("ConnectError"))
    assert is_transient(named("HfHubHTTPError", response=Response(503)))
    assert not is_transient(named("HfHubHTTPError", response=Response(401)))
    wrapped = RuntimeError("download failed")
    wrapped.__cause__ = named("ConnectTimeout")
    assert is_transient(wrapped) and not is_transient(RuntimeError("unknown"))
