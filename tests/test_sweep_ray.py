"""``sweep --on ray`` on a real Ray cluster of several nodes on this machine (tests/ray_cluster):
a node killed mid-job, its job finishes on another node from its newest checkpoint, and every job
of the sweep ends bit-identical to its uninterrupted run.

Ray is an extra (``timellm-job[ray]``) that CI does not install, to keep the suite within its
budget: this file is skipped there and run by ``python -m benchmarks.ray_node_loss``, whose output
is committed (benchmarks/results-ray-node-loss.json)."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from tests.cli import REPO, SLOW, argv, env_for, state, submit_of, wait_for_checkpoint, wait_until
from tests.jobfiles import final_state, quick_spec, solo_run
from tests.ray_cluster import ray_cluster

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")


@pytest.mark.slow
def test_a_node_lost_mid_job_its_job_ends_on_another_node_as_its_solo_run(reference, tmp_path):
    seven = solo_run(tmp_path / "solo-seed7", train={"seed": 7})
    root, sweep = tmp_path / "sweep-root", tmp_path / "rs.yaml"
    sweep.write_text(yaml.safe_dump({"name": "rs", "base": str(quick_spec(tmp_path)),
                                     "grid": {"train.seed": [2021, 7]}}))  # 2021: the reference's own seed
    with ray_cluster(env_for(tmp_path, **SLOW), workers=2) as cluster:
        proc = subprocess.Popen(argv("sweep", str(sweep), "--on", "ray", "--root", str(root)), cwd=REPO,
                                env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            job = root / "rs-seed2021"
            wait_for_checkpoint(job, "step", proc)
            first = wait_until(lambda: submit_of(f"/{job.name}.yaml"), "the job's submit", alive=[proc])
            lost = cluster.node_of(first.pid)
            assert lost in cluster.workers
            killed_at = time.monotonic()
            cluster.kill_node(lost)  # the machine under the job is gone: raylet, Ray worker, submit, trainer
            rerun = wait_until(lambda: (p := submit_of(f"/{job.name}.yaml")) and p.pid != first.pid and p,
                               "the job's submit run again by Ray", alive=[proc])
            elsewhere = cluster.node_of(rerun.pid)
            print(f"node {lost} killed; job {job.name} running again on {elsewhere} "
                  f"{time.monotonic() - killed_at:.1f} s later")
            out, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    print(out)
    assert proc.returncode == 0, out
    assert elsewhere in cluster.workers and elsewhere != lost
    assert state(job)["phase"] == "completed" and final_state(job) == reference
    assert state(root / "rs-seed7")["phase"] == "completed" and final_state(root / "rs-seed7") == seven
    assert len(state(job)["attempts"]) >= 2  # the lost one, closed after the fact, and the one that ended it
