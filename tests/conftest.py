"""Shared fixtures: storage backends on real local servers (GCS emulator, moto S3), never a cloud."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests import servers
from timellm_job.jobs.messages import log_to_stderr

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ETTH1 = SHARED / "data" / "ETT-small" / "ETTh1.csv"
TINY_SPEC = SHARED / "spec" / "jobs" / "tiny-cpu.yaml"
BIG_SPEC = SHARED / "spec" / "jobs" / "etth1-llama3-nf4.yaml"

# Every process a test starts loads the test-only fault injection (tests/faults/sitecustomize.py).
FAULTS = Path(__file__).parent / "faults"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)

# One intra-op thread per process (set before torch is imported here or in any process a test
# starts): scripts/test.sh runs two test files at once, and two processes that each spin as many
# threads as there are cores slow each other 10-30 times on 2 cores. A reference run and the runs
# compared with it always share this setting (CPU results depend on the thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The product's messages reach stderr as its entry points send them there (python -m
# timellm_job.trainer, submit), so a test that calls the product in-process reads them as a
# terminal would (capsys).
log_to_stderr()

# Never reach a cloud metadata server or a real endpoint from tests.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # no test reaches huggingface.co; hub tests serve their own
os.environ.update(servers.s3_env())


@pytest.fixture(scope="session")
def gcs_server():
    server = servers.start_gcs()
    os.environ.update(servers.gcs_env(server))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    server = servers.start_s3()
    import boto3

    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=servers.S3_BUCKET)
    yield server
    server.stop()


BACKENDS = ["local", "memory", "gcs", "s3"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(root URL, storage options) of a fresh, empty root on each backend."""
    unique = uuid.uuid4().hex[:10]
    if request.param == "local":
        return str(tmp_path / "root"), {}
    if request.param == "memory":
        return f"memory://t-{unique}", {}
    if request.param == "gcs":
        server = request.getfixturevalue("gcs_server")
        return f"gs://{servers.GCS_BUCKET}/{unique}", servers.gcs_options(server)
    server = request.getfixturevalue("s3_server")
    return f"s3://{servers.S3_BUCKET}/{unique}", servers.s3_options(server)


def _once(tmp_path_factory, worker_id: str, name: str, make):
    """``make(folder)``'s result (JSON), made once per suite: the first test process that needs it
    makes it under a lock in the folder the test processes share; the others read it there."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    result = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not result.exists():
            result.write_text(json.dumps(make(shared / name)))
        return json.loads(result.read_text())


@pytest.fixture(scope="session")
def reference(tmp_path_factory, worker_id):
    """The quick job trained once, uninterrupted, by the trainer alone: what every
    interrupted run must reproduce bit for bit."""
    from tests.jobfiles import solo_run

    return _once(tmp_path_factory, worker_id, "reference", solo_run)


@pytest.fixture(scope="session")
def completed(tmp_path_factory, worker_id) -> tuple[Path, Path]:
    """The quick job, trained to completion by ``submit`` once per suite: (its spec, its storage
    root). Shared by every test that needs a finished job: such a test works on a copy
    (``tests.jobfiles.copy_of``), never on this one."""
    from tests.cli import run
    from tests.jobfiles import quick_spec

    def make(folder: Path) -> list[str]:
        folder.mkdir()
        spec = quick_spec(folder)
        result = run(folder, "submit", str(spec))
        assert result.returncode == 0, result.stderr
        return [str(spec), str(folder / "root")]

    spec, root = _once(tmp_path_factory, worker_id, "completed", make)
    return Path(spec), Path(root)


def pytest_collection_modifyitems(config, items):
    """Files marked ``long`` first, then the rest as xdist orders them (files with the most tests
    first; ``--no-loadscope-reorder`` keeps this order). A run of several minutes never starts
    last while the other test process idles, and the end-to-end files, which contend when two run
    at once, stay mixed with the unit files."""
    per_file: dict[str, int] = {}
    for item in items:
        per_file[item.nodeid.split("::")[0]] = per_file.get(item.nodeid.split("::")[0], 0) + 1

    def order(item) -> tuple[int, int]:
        return (0 if item.get_closest_marker("long") else 1, -per_file[item.nodeid.split("::")[0]])

    items.sort(key=order)
