"""``sweep --on skypilot``: every task built by SkyPilot's own loader (its own venv, .venv-tools),
the launch recorded instead of reaching a cloud. The recorder then does what the task's ``run``
does on a VM: reads ``JOB_SPEC`` from the bucket (moto's S3 on 127.0.0.1) and runs ``submit``.

What stays untested here (no cloud is reachable): SkyPilot's ``jobs.launch`` itself, its
controller, the VMs and their recovery after a preemption (docs/many-jobs.md)."""

from __future__ import annotations

import copy
import os
import subprocess
import uuid

import fsspec
import pytest
import yaml

from tests import servers
from tests.cli import REPO, argv, env_for
from tests.jobfiles import quick_spec, slice_csv
from tests.tools import tool
from timellm_job.jobs.sweep import load_sweep
from timellm_job.orchestrator.submit import InputError
from timellm_job.orchestrator.sweep_sky import LAUNCH_SPEC, SkyPilotEngine, ask_skypilot

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # what a VM's identity gives


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A bucket root and the options any machine uses to reach it (no credentials: the environment's)."""
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    options = {"client_kwargs": {"endpoint_url": s3_server.url}}
    return f"s3://{servers.S3_BUCKET}/sky-{uuid.uuid4().hex[:8]}", options


def _sweep_file(tmp_path, root: str, options: dict, data: str) -> str:
    base = yaml.safe_load(quick_spec(tmp_path).read_text())
    base["storage"].update({"root": root, "options": options})
    base["data"]["path"] = data
    base["train"]["epochs"] = 1
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sky.yaml"
    path.write_text(yaml.safe_dump({"name": "sky", "base": "base.yaml", "grid": {"train.seed": [1, 2]}}))
    return str(path)


class VMs:
    """The launch seam: records each request and runs its job as the task's ``run`` would on a VM."""

    def __init__(self, tmp_path, options: dict):
        self.tmp, self.options, self.requests, self.procs = tmp_path, options, [], []

    def __call__(self, request: dict) -> dict:
        self.requests.append(copy.deepcopy(request))
        (job,) = request["jobs"]
        vm = self.tmp / "vm" / job["name"]
        vm.mkdir(parents=True)
        with fsspec.open(job["envs"]["JOB_SPEC"], "rb", **self.options) as f:
            (vm / "job.yaml").write_bytes(f.read())
        self.procs.append(subprocess.Popen(argv("submit", str(vm / "job.yaml")), cwd=vm, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.STDOUT, env=env_for(vm, **AWS)))
        return {"jobs": [{"name": job["name"], "managed_job_ids": [len(self.requests)]}]}


@pytest.mark.slow
def test_each_grid_point_is_one_managed_job_of_the_projects_task_and_a_second_sweep_launches_none(tmp_path, bucket):
    root, options = bucket
    data = f"{root}/data/{slice_csv(tmp_path).name}"
    fsspec.filesystem("s3", **options).put(str(slice_csv(tmp_path)), data)
    plan = load_sweep(_sweep_file(tmp_path, root, options, data))
    vms = VMs(tmp_path, options)
    try:
        code = SkyPilotEngine(plan, launch=vms, python=str(tool("python")), poll_s=0.5, hf_token="hf_example").run()
    finally:
        for p in vms.procs:
            p.wait(timeout=600)
    assert code == 0 and [p.returncode for p in vms.procs] == [0, 0]
    assert [r["jobs"][0]["name"] for r in vms.requests] == ["sky-seed1", "sky-seed2"]
    for request, point in zip(vms.requests, plan.points, strict=True):
        assert request["config"] == yaml.safe_load((REPO / "docker" / "skypilot-task.yaml").read_text())
        (job,) = request["jobs"]
        assert job["envs"] == {"JOB_SPEC": f"{root}/{point.name}/{LAUNCH_SPEC}"}
        assert job["secrets"] == {"HF_TOKEN": "hf_example"}
        with fsspec.open(job["envs"]["JOB_SPEC"], "rb", **options) as f:
            launched = yaml.safe_load(f.read())
        assert (launched["name"], launched["train"]["seed"]) == (point.name, point.fields["train.seed"])
        # SkyPilot's own loader, in SkyPilot's own Python, makes of it the project's task for this job
        (task,) = ask_skypilot(str(tool("python")), {**request, "mode": "build"})["jobs"]
        assert (task["name"], task["cloud"], task["accelerators"], task["use_spot"]) == (point.name, "GCP",
                                                                                         {"T4": 1}, True)
        assert task["envs"]["JOB_SPEC"] == job["envs"]["JOB_SPEC"] and task["secrets"] == ["HF_TOKEN"]
        assert "HF_TOKEN" not in task["envs"] and "timellm-job submit job.yaml" in task["run"]
    again = VMs(tmp_path / "again", options)
    assert SkyPilotEngine(plan, launch=again, python=str(tool("python")), poll_s=0.5).run() == 0
    assert again.requests == []  # both completed: nothing launched


def test_what_a_vm_cannot_reach_is_refused_before_anything_is_written_or_launched(tmp_path, bucket):
    root, options = bucket
    local = load_sweep(_sweep_file(tmp_path, str(tmp_path / "root"), {}, str(slice_csv(tmp_path))))
    vms = VMs(tmp_path, options)
    with pytest.raises(InputError, match="storage.root"):
        SkyPilotEngine(local, launch=vms, python=str(tool("python"))).run()
    secret = load_sweep(_sweep_file(tmp_path, root, {**options, "key": "AKIA...", "secret": "s"}, f"{root}/d.csv"))
    with pytest.raises(InputError, match="storage.options"):
        SkyPilotEngine(secret, launch=vms, python=str(tool("python"))).run()
    assert vms.requests == [] and not (tmp_path / "root").exists()
    assert not fsspec.filesystem("s3", **options).exists(root)


def test_without_skypilot_on_path_the_sweep_exits_2_saying_how_to_install_it(tmp_path):
    sweep = _sweep_file(tmp_path, "s3://bucket/root", {}, "s3://bucket/d.csv")
    done = subprocess.run(argv("sweep", sweep, "--on", "skypilot"), cwd=tmp_path, capture_output=True, text=True,
                          env={**env_for(tmp_path), "PATH": os.path.dirname(argv()[0])}, timeout=120)
    assert done.returncode == 2 and "`sky` is not on PATH" in done.stderr and "pipx install" in done.stderr
    assert not (tmp_path / "work").exists()
