"""The trainer's log goes to the job folder in segments: each upload writes only what is new,
a full segment is never rewritten, readers see the whole log in order."""

from __future__ import annotations

import os

from timellm_job.storage import open_store
from timellm_job.storage.layout import LOGS
from timellm_job.storage.log_segments import LogUploader, log_attempts, read_log


def test_uploads_write_only_what_is_new_and_full_segments_stay_untouched(tmp_path):
    job = open_store(str(tmp_path / "job"))
    local = tmp_path / "attempt-002.log"
    uploader = LogUploader(job, 2, segment_bytes=100)
    text = b""
    inodes: dict[str, int] = {}
    for i in range(30):  # a log growing by ~13 bytes a time, uploaded after each write
        line = f"step {i} loss 0.{i:03d}\n".encode()
        text += line
        with open(local, "ab") as f:
            f.write(line)
        uploader.upload(local)
        names = sorted(n for n, _, _ in job.list_dir(LOGS))
        for name in names[:-1]:  # every full segment: written once, never again
            inode = os.stat(job.full(f"{LOGS}/{name}")).st_ino
            assert inodes.setdefault(name, inode) == inode, name
        assert read_log(job, 2) == text
    sizes = [s for _, _, s in job.list_dir(LOGS)]
    assert len(sizes) == -(-len(text) // 100) and all(s == 100 for s in sizes[:-1])
    uploader.upload(local)  # nothing new: nothing written
    assert read_log(job, 2) == text and log_attempts(job) == [2]


def test_a_log_of_an_earlier_version_is_still_read(tmp_path):
    job = open_store(str(tmp_path / "job"))
    job.replace(f"{LOGS}/attempt-001.log", b"old whole file\n")
    job.replace(f"{LOGS}/attempt-003-0000.log", b"new\n")
    assert log_attempts(job) == [1, 3] and read_log(job, 1) == b"old whole file\n" and read_log(job, 3) == b"new\n"


def test_the_metrics_log_seals_its_segments_the_same_way(tmp_path, monkeypatch):
    """The metrics log and the trainer's log share one segmented writer (storage.segments)."""
    from timellm_job.storage import metrics_log
    from timellm_job.storage.layout import METRICS

    monkeypatch.setattr(metrics_log, "SEGMENT_LINES", 3)
    job = open_store(str(tmp_path / "job"))
    inodes: dict[str, int] = {}
    for attempt in (1, 2):
        log = metrics_log.MetricsLog(job, attempt)
        for step in range(8):
            log.add(step=step, time=0.0)
            log.flush()
            names = sorted(n for n, _, _ in job.list_dir(METRICS) if n.startswith(f"attempt-{attempt:03d}"))
            for name in names[:-1]:  # sealed: written once, never again
                inode = os.stat(job.full(f"{METRICS}/{name}")).st_ino
                assert inodes.setdefault(name, inode) == inode, name
    assert metrics_log.metrics_attempts(job) == [1, 2]
    assert [(r["attempt"], r["step"]) for r in metrics_log.read_metrics(job)] == \
        [(a, s) for a in (1, 2) for s in range(8)]
    assert len([n for n, _, _ in job.list_dir(METRICS)]) == 6  # 3 + 3 + 2 lines, per attempt
