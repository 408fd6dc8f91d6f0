"""Trainer processes that share a machine share its cores (orchestrator.threads)."""

from __future__ import annotations

import pytest

from timellm_job.orchestrator.threads import cgroup_cpu_limit, thread_env, threads_per_process


@pytest.mark.parametrize("processes,cores,each", [(2, 2, 1), (2, 16, 8), (4, 16, 4), (3, 16, 5), (8, 2, 1)])
def test_processes_started_together_run_no_more_threads_than_cores(processes, cores, each):
    assert threads_per_process(processes, cores) == each
    assert processes * each <= max(cores, processes)  # one thread each at the least


def test_one_process_is_left_to_torch_and_a_users_setting_is_kept():
    assert thread_env(1, {}, cores=16) == {}
    assert thread_env(2, {"OMP_NUM_THREADS": "3"}, cores=16) == {}
    assert thread_env(2, {}, cores=16) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}


def test_a_cgroup_quota_limits_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores (cgroup v2)
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000")  # cgroup v1: 4 cores
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(tmp_path) == 4.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(tmp_path) is None
