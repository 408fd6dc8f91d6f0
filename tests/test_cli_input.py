"""Bad input: exit 2, a message naming the field, and nothing written (storage and local)."""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml

from tests.cli import run
from tests.jobfiles import BIG_SPEC, TINY_SPEC, quick_spec
from timellm_job.jobs import SpecError, load_spec

CORPUS = [
    # (a --set override or a raw edit, the field the message must name)
    ({"data.seq_len": "abc"}, "data.seq_len"),
    ({"data.seq_len": "0"}, "data.seq_len"),
    ({"data.pred_len": "-3"}, "data.pred_len"),
    ({"data.percent": "101"}, "data.percent"),
    ({"data.features": "X"}, "data.features"),
    ({"data.kind": "Weather"}, "data.kind"),
    ({"data.target": "nope"}, "data.target"),
    ({"data.path": "/no/such/file.csv"}, "data.path"),
    ({"data.label_len": "500"}, "data"),
    ({"data.seq_len": "100000"}, "data.seq_len"),
    ({"model.quantization": "fp3"}, "model.quantization"),
    ({"model.dropout": "1.5"}, "model.dropout"),
    ({"model.d_ff": "999"}, "model.d_ff"),
    ({"model.patch_len": "500"}, "model.patch_len"),
    ({"model.llm_layers": "9"}, "llm_layers"),
    ({"model.backbone.pretrained": "./nowhere"}, "model.backbone"),
    ({"model.backbone.random.family": "t5"}, "model.backbone.random.family"),
    ({"model.backbone.random.num_heads": "5"}, "model.backbone.random"),
    ({"model.colour": "red"}, "model.colour"),
    ({"train.epochs": "0"}, "train.epochs"),
    ({"train.learning_rate": "-1"}, "train.learning_rate"),
    ({"train.batch_size": "1.5"}, "train.batch_size"),
    ({"train.batch_size": "100000"}, "train.batch_size"),
    ({"train.device": "tpu"}, "train.device"),
    ({"train.device": "cuda"}, "train.device"),
    ({"train.optimiser": "sgd"}, "train.optimiser"),
    ({"storage.save_steps": "0"}, "storage.save_steps"),
    ({"storage.root": "nosuchproto://x"}, "storage.root"),
    ({"storage.root": "/proc/forbidden"}, "storage.root"),
    ({"run.max_restarts": "-1"}, "run.max_restarts"),
    ({"run.heartbeat_timeout_s": "0"}, "run.heartbeat_timeout_s"),
    ({"name": "../escape"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"extra_section": "1"}, "extra_section"),
    # issue 23, item 14: values that passed validation and then crash-looped
    ({"model.d_model": "1.0e+11"}, "model.d_model"),  # YAML reads 1e11 as a string; this is a float
    ({"model.num_tokens": "1000000", "model.backbone.random.vocab_size": "200000"}, "model.num_tokens"),
]


def test_every_example_is_accepted_as_written():
    for path in (TINY_SPEC, BIG_SPEC):
        spec = load_spec(path)
        assert spec.name and spec.storage.save_steps > 0


@pytest.mark.parametrize("sets, field", CORPUS, ids=[next(iter(s)) + "=" + next(iter(s.values())) for s, _ in CORPUS])
def test_malformed_spec_exits_2_naming_the_field_and_writes_nothing(tmp_path, sets, field):
    # no warm spare: each refusal after the spec reads would start one and kill it unclaimed, 2 s
    # of CPU each here (the refusals below keep theirs; tests/test_spare.py covers discarding one)
    spec = quick_spec(tmp_path, run={"warm_spare": False})
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["submit", str(spec)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    result = run(tmp_path, *args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no root, no work folder
    assert not (tmp_path / "root").exists() and not (tmp_path / "work").exists()


def test_quantization_without_bitsandbytes_exits_2_naming_the_field(tmp_path):
    """The pre-flight finds bitsandbytes without importing it (it runs before every start);
    a machine without it is told so before anything is written."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    spec = quick_spec(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(tmp_path, "submit", str(spec), "--set", "model.quantization=nf4", timeout=120,
                 PYTHONPATH=str(hide))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.quantization: nf4 needs bitsandbytes, which is not installed" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("text, needle", [
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("", "mapping"),
    ("name: x\nstorage: {root: /tmp}\n", "data: Field required"),
])
def test_broken_yaml_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run(tmp_path, "submit", str(path), timeout=60)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_spec_file(tmp_path):
    result = run(tmp_path, "submit", str(tmp_path / "nope.yaml"), timeout=60)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_missing_bucket_is_bad_input(tmp_path, s3_server):
    from tests import servers

    spec = quick_spec(tmp_path, storage={"root": "s3://no-such-bucket/x", "options": servers.s3_options(s3_server)})
    result = run(tmp_path, "submit", str(spec), timeout=120)
    assert result.returncode == 2 and "storage.root" in result.stderr and "no-such-bucket" in result.stderr


def test_relative_paths_resolve_against_the_spec_folder(tmp_path, monkeypatch):
    spec = load_spec(TINY_SPEC)
    assert spec.data.path == str((TINY_SPEC.parent / "../../data/ETT-small/ETTh1.csv").resolve())
    assert spec.storage.root == str(TINY_SPEC.parent / "runs")
    assert load_spec(TINY_SPEC, root="memory://x").storage.root == "memory://x"
    monkeypatch.chdir(tmp_path)  # a --root on the command line is relative to the shell's folder
    assert load_spec(TINY_SPEC, root="runs/here").storage.root == str(tmp_path / "runs" / "here")


def test_spec_errors_list_every_bad_field_at_once(tmp_path):
    raw = yaml.safe_load(TINY_SPEC.read_text())
    raw["data"]["seq_len"] = "x"
    raw["train"]["epochs"] = -1
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "data.seq_len" in str(err.value) and "train.epochs" in str(err.value)


def test_status_of_an_unknown_job(tmp_path):
    spec = quick_spec(tmp_path)
    result = run(tmp_path, "status", str(spec), "--json", timeout=60)
    assert result.returncode == 1 and "no job" in result.stderr
    assert not os.path.exists(tmp_path / "root")


def test_a_section_check_names_its_field_with_the_dotted_path(tmp_path):
    spec = quick_spec(tmp_path, model={"llm_layers": 5})
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert str(err.value) == "model.llm_layers: 5 exceeds the backbone's 2 layers"


def test_an_eta_past_a_day_does_not_wrap_in_any_view():
    """One formatter for status, the submit terminal and the trainer's progress line (the last
    wrapped at 24 hours while it had its own)."""
    import io
    from contextlib import redirect_stderr

    from timellm_job.jobs.messages import duration
    from timellm_job.jobs.protocol import Heartbeat
    from timellm_job.orchestrator.progress_view import describe
    from timellm_job.trainer.reporting import ProgressLine

    assert duration(30 * 3600 + 61) == "1d 06:01:01" and duration(59) == "00:00:59"
    assert duration(None) == duration(float("nan")) == duration(-1) == "?"
    beat = Heartbeat(phase="training", step=0, total_steps=30 * 3600 + 61, steps_per_s=1.0)
    assert describe(beat)[3].endswith("ETA 1d 06:01:01")
    line = ProgressLine(total=10**9, start_step=0)
    line.t0 -= 10.0  # ten seconds in, one step done: a billion steps left at 0.1 steps/s
    with redirect_stderr(io.StringIO()) as err:
        line.update(1, 0, 0.5, 1e-3, force=True)
    days = re.search(r"ETA (\d+)d \d\d:\d\d:\d\d$", err.getvalue().strip())
    assert days and 115_000 < int(days.group(1)) < 116_000, err.getvalue()  # about 115,741 days, not mod 24 h


def test_help_lists_every_command_whole_and_the_exit_codes():
    from click.testing import CliRunner

    from timellm_job.orchestrator.cli import main

    shown = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    for name in main.commands:
        line = next(ln for ln in shown.splitlines() if ln.strip().startswith(name + " "))
        assert not line.rstrip().endswith("..."), line
    assert "Exit codes:" in shown and "143" in shown and max(map(len, shown.splitlines())) <= 80


def test_a_bitsandbytes_that_cannot_run_the_quantization_here_exits_2_naming_the_field(tmp_path):
    """bitsandbytes 0.45 installs and imports on a CPU, then cannot quantize NF4 there: the
    pre-flight runs a small quantized layer on the job's device and says so before anything is
    written (tests/faults makes the installed bitsandbytes behave so)."""
    spec = quick_spec(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(tmp_path, "submit", str(spec), "--set", "model.quantization=nf4", timeout=120,
                 TIMELLM_TEST_BNB_NO_CPU_NF4="1")
    assert result.returncode == 2, result.stdout + result.stderr
    line = next(ln for ln in result.stderr.splitlines() if "model.quantization" in ln)
    assert line.removeprefix("error: ").startswith("model.quantization: nf4 cannot run on cpu with the installed bitsandbytes")
    assert "NotImplementedError" in line and "model.quantization: none" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_installed_bitsandbytes_runs_nf4_and_int8_on_this_cpu():
    from timellm_job.trainer.preflight import quantization_problem

    spec = load_spec(TINY_SPEC)
    for q in ("nf4", "int8"):
        assert quantization_problem(spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": q})}),
                                    "cpu") is None


def _dir_store_spec(tmp_path, **storage) -> object:
    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    raw["storage"].update({"root": "dir://shared", "options": {
        "path": str(tmp_path / "store"), "target_protocol": "file", "target_options": {"auto_mkdir": True}}, **storage})
    raw["train"]["epochs"] = 1
    path = tmp_path / "dir.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_store_without_create_only_writes_is_refused_unless_unsafe_single_writer_is_set(tmp_path):
    (tmp_path / "store" / "shared").mkdir(parents=True)
    result = run(tmp_path, "submit", str(_dir_store_spec(tmp_path)), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: storage.root: dir://shared/quick (fsspec protocol 'dir') cannot write an object only if absent" \
        in result.stderr and "storage.unsafe_single_writer: true" in result.stderr
    assert list((tmp_path / "store" / "shared").iterdir()) == []
    spec = _dir_store_spec(tmp_path, unsafe_single_writer=True)
    result = run(tmp_path, "submit", str(spec), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning: UNSAFE single-writer mode" in result.stderr
    shown = run(tmp_path, "status", str(spec))
    assert "UNSAFE single-writer mode" in shown.stdout.replace("\n", " ") or "UNSAFE" in shown.stdout


def _unreachable_spec(tmp_path):
    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    # a GCS endpoint on 127.0.0.1 where nothing listens: every call is refused, and gcsfs retries
    # each one for about a minute on its own
    raw["storage"].update({"root": "gs://nobucket/jobs", "options": {"token": "anon",
                                                                     "endpoint_url": "http://127.0.0.1:9"}})
    path = tmp_path / "unreachable.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["status", "submit"])
def test_an_unreachable_storage_root_fails_in_bounded_time_in_one_line(tmp_path, command):
    spec = _unreachable_spec(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.monotonic()
    result = run(tmp_path, command, str(spec), timeout=120, TIMELLM_JOB_PROBE_S="4",
                 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    took = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: storage.root: cannot reach gs://nobucket/jobs/quick"), lines
    assert "Traceback" not in result.stderr and took < 4 + 15  # the probe's bound, plus start-up
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_unexpected_error_is_one_line_and_its_traceback_comes_with_debug(tmp_path):
    """A disk that answers every read with EIO (tests/faults/faultyfs.py): one line, exit 1."""
    from tests.faults.faultyfs import write_plan

    spec = quick_spec(tmp_path)
    job = tmp_path / "root" / "quick"
    job.mkdir(parents=True)
    (job / "state.json").write_text("{}")
    plan = tmp_path / "faults.json"
    write_plan(plan, [{"op": "read", "kind": "eio", "match": "state.json"}])
    faulty = {"TIMELLM_TEST_FAULT_PLAN": str(plan), "TIMELLM_JOB_STORAGE_RETRY_S": "1"}
    root = f"faulty://{tmp_path / 'root'}"
    plain = run(tmp_path, "status", str(spec), "--root", root, timeout=120, **faulty)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()] and "Input/output error" in plain.stderr
    assert "--debug" in plain.stderr
    debug = run(tmp_path, "--debug", "status", str(spec), "--root", root, timeout=120, **faulty)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_name_is_matched_whole_and_yaml_aliases_are_refused(tmp_path):
    """Issue 23, item 15: a name ending in a newline passed (``$`` is not a full match), and a
    412-byte YAML alias bomb ran 22 s into a MemoryError."""
    raw = yaml.safe_load(quick_spec(tmp_path).read_text())
    bad = tmp_path / "newline.yaml"
    bad.write_text(yaml.safe_dump({**raw, "name": "quick\n"}))
    with pytest.raises(SpecError, match="^name:"):
        load_spec(bad)
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    bomb.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(SpecError, match="aliases"):
        load_spec(bomb)
    assert time.monotonic() - started < 5


def test_a_storage_root_that_is_a_file_exits_2_and_writes_nothing(tmp_path):
    spec = quick_spec(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    result = run(tmp_path, "submit", str(spec), "--root", str(tmp_path / "afile"), timeout=120)
    assert result.returncode == 2 and "storage.root" in result.stderr, result.stderr
    assert (tmp_path / "afile").read_text() == "not a folder" and not (tmp_path / "work").exists()


def test_values_too_large_to_scale_are_refused_naming_the_column(tmp_path):
    """Issue 23, item 14: a CSV of 1e308 values passed, then every attempt's loss was NaN at step
    1 (lease taken, files written, three crashes, exit 1). Pre-flight refuses it, naming the column."""
    spec = quick_spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    lines = open(raw["data"]["path"]).read().splitlines()
    header, rows = lines[0], lines[1:]
    ot = header.split(",").index("OT")
    huge = []
    for i, row in enumerate(rows):
        cells = row.split(",")
        cells[ot] = f"{(-1) ** i * 1e308}"
        huge.append(",".join(cells))
    (tmp_path / "huge.csv").write_text("\n".join([header, *huge]) + "\n")
    result = run(tmp_path, "submit", str(spec), "--set", f"data.path={tmp_path / 'huge.csv'}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "data.path" in result.stderr and "'OT'" in result.stderr and "too large to scale" in result.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "work").exists()
