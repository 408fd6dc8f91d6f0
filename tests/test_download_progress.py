"""Bytes during a backbone download: the trainer's keep-alive beats carry how far the hub
download has come (its blobs in the Hugging Face cache, partial files included), and the
terminal shows it beside the phase."""

from __future__ import annotations

import json

from tests.cli import wait_until
from timellm_job.jobs.protocol import Heartbeat
from timellm_job.orchestrator.progress_view import describe
from timellm_job.trainer.backbone import hub_cache_bytes
from timellm_job.trainer.reporting import HeartbeatWriter


def test_the_download_reaches_the_heartbeat_and_the_terminal(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    blobs = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "aaa").write_bytes(b"x" * 1000)
    (blobs / "bbb.incomplete").write_bytes(b"y" * 500)  # a shard still arriving
    assert hub_cache_bytes("meta-llama/Meta-Llama-3-8B") == 1500
    assert hub_cache_bytes("nobody/nothing") == 0
    beat_file = tmp_path / "beat.json"
    heartbeat = HeartbeatWriter(str(beat_file), interval=0)
    with heartbeat.keepalive(60, "loading the backbone",
                             lambda: {"download_bytes": hub_cache_bytes("meta-llama/Meta-Llama-3-8B")}):
        def beat_reports(n: int) -> bool:
            return json.loads(beat_file.read_text() if beat_file.exists() else "{}").get("download_bytes") == n

        wait_until(lambda: beat_reports(1500), "a beat with the first file's bytes", timeout=30)
        (blobs / "bbb.incomplete").write_bytes(b"y" * 5000)
        wait_until(lambda: beat_reports(6000), "a beat with both files' bytes", timeout=30)
        doc = json.loads(beat_file.read_text())
    assert doc["busy"] == "loading the backbone"
    phase, done, total, details = describe(Heartbeat.parse({**doc, "download_bytes": 1_530_000_000}))
    assert (phase, details) == ("loading the backbone", "1.53 GB downloaded")
    assert json.loads(beat_file.read_text()).get("download_bytes") is None  # the download is over
