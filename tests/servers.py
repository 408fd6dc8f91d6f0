"""Real local servers for the tests: the GCS emulator and moto's S3 server, on 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.cli import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:
        return True  # an error status is an answer
    except OSError:
        return False
    return True


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    wait_until(lambda: _answers(url), f"the server at {url} to answer", timeout, alive=[proc])


class Server:
    def __init__(self, argv: list[str], url: str, probe: str, env: dict | None = None):
        self.url = url
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        _wait_http(probe, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


GCS_BUCKET = "timellm-test"
S3_BUCKET = "timellm-test"


def start_gcs() -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return Server([_bin("gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port),
                   "--in-memory", "--default-bucket", GCS_BUCKET], url, url + "/storage/v1/b")


def start_s3() -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return Server([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], url, url + "/moto-api/")


def gcs_env(server: Server) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": server.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def s3_env() -> dict[str, str]:
    return {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


def s3_options(server: Server) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": server.url}}


def gcs_options(server: Server) -> dict:
    return {"token": "anon", "endpoint_url": server.url}
