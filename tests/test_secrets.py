"""Credentials in ``storage.options`` stay secret: redacted at any depth in the stored spec, in
no argv of any process the job starts, and on local disk only in files readable by their owner."""

from __future__ import annotations

import stat
import time
import uuid

import psutil
import pytest

from tests import servers
from tests.cli import start
from tests.jobfiles import quick_spec
from timellm_job.orchestrator.redaction import redacted, redacted_url


def test_secrets_are_redacted_at_any_depth():
    doc = {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1", "aws_session_token": "t"},
           "token": {"type": "service_account", "private_key": "p"}, "project": "p1", "list": [{"password": "x"}]}
    assert redacted(doc) == {"key": "<redacted>", "client_kwargs": {"endpoint_url": "http://127.0.0.1",
                                                                    "aws_session_token": "<redacted>"},
                             "token": "<redacted>", "project": "p1", "list": "<redacted>"}


def test_every_option_is_redacted_but_the_harmless_ones():
    """Issue 23, item 11: redaction by key name let connection_string, headers.Authorization,
    passwd, sas and URL user-info reach storage. Now a value survives only under a key known to
    be harmless, a token only when it names a method (anon), and URLs lose user-info and query."""
    doc = {"connection_string": "DefaultEndpointsProtocol=https;AccountKey=SECRET1",
           "headers": {"Authorization": "Bearer SECRET2"}, "passwd": "SECRET3", "sas": "sv=2&sig=SECRET4",
           "project": "my-project", "region_name": "us-east-1", "token": "anon",
           "client_kwargs": {"endpoint_url": "https://user:SECRET5@minio.local:9000", "api_key": "SECRET6"}}
    out = redacted(doc)
    assert "SECRET" not in repr(out)
    assert out["project"] == "my-project" and out["region_name"] == "us-east-1" and out["token"] == "anon"
    assert out["client_kwargs"]["endpoint_url"] == "https://<redacted>@minio.local:9000"
    assert redacted({"token": "/home/me/key.json"}) == {"token": "<redacted>"}
    assert redacted_url("https://acct.blob.core.windows.net/c/ETTh1.csv?sv=2022&sig=SECRET") == \
        "https://acct.blob.core.windows.net/c/ETTh1.csv?<redacted>"
    assert redacted_url("gs://bucket/root") == "gs://bucket/root"


@pytest.mark.slow


def test_a_planted_secret_reaches_no_stored_file_and_no_argv(s3_server, tmp_path):
    planted, nested = f"PLANTED-{uuid.uuid4().hex}", f"NESTED-{uuid.uuid4().hex}"
    options = servers.s3_options(s3_server)
    options = {**options, "secret": planted, "client_kwargs": {**options["client_kwargs"], "aws_session_token": nested}}
    root = f"s3://{servers.S3_BUCKET}/secrets-{uuid.uuid4().hex[:8]}"
    spec = quick_spec(tmp_path, storage={"root": root, "options": options}, train={"epochs": 1})
    proc = start(tmp_path, "submit", str(spec))
    seen_argv = set()
    while proc.poll() is None:  # every process the job starts, while it runs
        try:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                seen_argv.add(" ".join(p.cmdline()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    # the pre-flight, and the trainer: a warm spare's command line (its attempt's arguments come
    # on its standard input, the same as a cold trainer's argv, which holds no option either)
    assert any("trainer check" in a for a in seen_argv) and any("trainer spare" in a for a in seen_argv)
    assert not [a for a in seen_argv if planted in a or nested in a]
    assert planted not in out and nested not in out
    from timellm_job.storage import open_store

    store = open_store(root, options)
    written = [p for p in store.fs.find(store.root)]
    assert any(p.endswith("/job.yaml") for p in written) and any("/checkpoints/" in p for p in written)
    for path in written:
        data = store.fs.cat_file(path)
        assert planted.encode() not in data and nested.encode() not in data, path
    stored = store.read_bytes("quick/job.yaml").decode()
    assert "secret: <redacted>" in stored and "aws_session_token: <redacted>" in stored
    holders = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and planted.encode() in p.read_bytes()]
    assert holders, "the trainer's own copy of the spec must hold the credentials"
    for p in holders:  # only the local copies the job's processes read, and only for their owner
        assert p.name == "job.yaml" and stat.S_IMODE(p.stat().st_mode) == 0o600, p


