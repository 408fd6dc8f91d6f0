"""Warm spares (orchestrator.spare, trainer.spare): a trainer that did its imports before its
attempt began. A restart that claims one trains bit for bit as a cold start; a spare that cannot
be claimed, or dies, is killed and the attempt starts cold; none outlives its submit. End to end:
tests/test_memory_e2e.py (restarts claim spares, a killed spare is replaced), the chaos run
(a spare behind every attempt), tests/test_cli_e2e.py (cold starts, ``run.warm_spare: false``)."""

from __future__ import annotations

import json
import os
import signal
import sys

import psutil

from tests.jobfiles import quick_spec
from timellm_job.jobs import load_spec
from timellm_job.jobs.protocol import ENV_HEARTBEAT, TRAINER_MODULE
from timellm_job.orchestrator.children import attempt_env
from timellm_job.orchestrator.spare import Spare, Spares, spare_argv
from timellm_job.trainer.spare import model_class_name


def _spec(tmp_path, *sets: str):
    return load_spec(quick_spec(tmp_path), sets=sets)


def test_a_spare_preloads_the_backbone_the_job_builds(tmp_path):
    argv = spare_argv(_spec(tmp_path))
    assert argv[1:4] == ["-m", TRAINER_MODULE, "spare"]
    assert argv[argv.index("--deterministic") + 1] == "auto" and argv[argv.index("--preload") + 1] == "llama"
    gpt2 = spare_argv(_spec(tmp_path, "model.backbone.random.family=gpt2", "train.deterministic=false"))
    assert gpt2[gpt2.index("--preload") + 1] == "gpt2" and gpt2[gpt2.index("--deterministic") + 1] == "false"
    assert "--preload" not in spare_argv(_spec(tmp_path, "model.ablation=transformer"))  # no backbone at all


def test_no_spare_when_the_job_turns_it_off_or_runs_under_torchrun(tmp_path):
    assert spare_argv(_spec(tmp_path, "run.warm_spare=false")) is None
    assert spare_argv(_spec(tmp_path, "train.nproc=2")) is None


def test_the_model_class_is_found_without_the_network(tmp_path):
    assert model_class_name("llama") == "LlamaModel"
    assert model_class_name("gpt2") == "GPT2Model"
    folder = tmp_path / "bert-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert model_class_name(str(folder)) == "BertModel"  # a local folder: its config says
    assert model_class_name("nobody/not-on-this-machine") is None  # a hub id never downloaded: nothing fetched
    assert model_class_name(str(tmp_path / "missing")) is None


def _spare(tmp_path) -> Spare:
    return Spare(spare_argv(_spec(tmp_path)), attempt_env())


def test_a_spare_is_not_claimed_by_another_environment_or_command_and_is_killed(tmp_path):
    argv = [sys.executable, "-m", TRAINER_MODULE, "run", "job.yaml"]
    spare = _spare(tmp_path)
    env = {**attempt_env({"OMP_NUM_THREADS": "7"}), ENV_HEARTBEAT: str(tmp_path / "hb.json")}
    assert spare.claim(argv, env, tmp_path / "a.log") is None
    assert spare.proc.returncode == -signal.SIGKILL and not spare.alive()
    spare = _spare(tmp_path)
    env = {**attempt_env(), ENV_HEARTBEAT: str(tmp_path / "hb.json")}
    assert spare.claim(["/another/python", *argv[1:]], env, tmp_path / "a.log") is None
    assert not spare.alive()


def test_a_dead_spare_is_not_claimed(tmp_path):
    spare = _spare(tmp_path)
    os.killpg(spare.pid, signal.SIGKILL)
    spare.proc.wait(10)
    env = {**attempt_env(), ENV_HEARTBEAT: str(tmp_path / "hb.json")}
    assert spare.claim([sys.executable, "-m", TRAINER_MODULE, "run", "job.yaml"], env, tmp_path / "a.log") is None


def test_spares_start_once_an_attempt_has_trained_and_stop_after_three_deaths(tmp_path, monkeypatch, caplog):
    spares = Spares().configure(_spec(tmp_path))
    spares.watch(None, stopping=False)  # no step taken yet
    spares.watch(119.0, stopping=False)  # trained, but not 2 minutes
    assert spares.spare is None
    spares.watch(120.0, stopping=True)  # stopping: none
    assert spares.spare is None
    seen = []
    for _ in range(3):
        spares.watch(120.0, stopping=False)
        assert spares.spare is not None and spares.spare.alive()
        seen.append(spares.spare.pid)
        os.killpg(spares.spare.pid, signal.SIGKILL)
        spares.spare.proc.wait(10)
    spares.watch(120.0, stopping=False)  # the third death: no more
    assert spares.spare is None and spares.deaths == 3 and len(set(seen)) == 3
    assert "starting no more: restarts start cold" in caplog.text
    monkeypatch.setenv("TIMELLM_JOB_SPARE_AFTER_S", "0")
    fresh = Spares().configure(_spec(tmp_path))
    fresh.watch(0.0, stopping=False)
    spare = fresh.take()
    assert spare is not None and fresh.spare is None
    spare.discard()
    assert not spare.alive()
    off = Spares().configure(_spec(tmp_path, "run.warm_spare=false"))
    off.start()
    assert off.spare is None


def test_a_claimed_spare_runs_the_trainer_with_the_claim_and_keeps_what_its_imports_printed(tmp_path):
    """Claimed for ``check`` (the trainer's pre-flight, quick): it runs it with the claim's
    arguments, its output goes to the attempt's log after what it printed while importing, and
    it takes the claim's heartbeat path."""
    spec = quick_spec(tmp_path)
    spare = Spare(spare_argv(load_spec(spec)), attempt_env({"PYTHONWARNINGS": "always"}))
    # a line printed before the claim stands in for an import's warning
    spare.output.write(b"printed while importing\n")
    spare.output.flush()
    log = tmp_path / "attempt-001.log"
    env = {**attempt_env({"PYTHONWARNINGS": "always"}), ENV_HEARTBEAT: str(tmp_path / "hb.json")}
    proc = spare.claim([sys.executable, "-m", TRAINER_MODULE, "check", str(spec)], env, log)
    assert proc is spare.proc
    assert proc.wait(120) == 0, log.read_text()
    lines = log.read_text().splitlines()
    assert lines[0] == "printed while importing"
    estimate = json.loads(lines[-1])  # check's result: the job's footprint
    assert estimate["checkpoint_bytes"] > 0


def test_a_bad_input_leaves_no_spare_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The first attempt's spare starts before the checks; a check that fails kills it."""
    from timellm_job.orchestrator.submit import submit

    spec = quick_spec(tmp_path)
    monkeypatch.setenv("TIMELLM_JOB_WORKDIR", str(tmp_path / "work"))
    (tmp_path / "short.csv").write_text("date,OT\n2016-07-01 00:00:00,1.0\n")
    seen: list[int] = []
    real_init = Spare.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self.pid)

    monkeypatch.setattr(Spare, "__init__", recording)
    assert submit(str(spec), None, (f"data.path={tmp_path / 'short.csv'}",)) == 2
    assert "data.seq_len" in capsys.readouterr().err  # the pre-flight check failed
    assert len(seen) == 1 and not psutil.pid_exists(seen[0])
    assert not (tmp_path / "root").exists() and not (tmp_path / "work").exists()
