"""What can be checked of the packaging without a Docker engine or a cloud: the files parse, the
image's entry point is the CLI, and every timellm-job command they run is a real subcommand."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from tests.tools import tool, tools_python
from timellm_job.orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = set(main.commands)


def used_commands(text: str) -> list[str]:
    return re.findall(r"timellm-job (\w[\w-]*)", text)


def test_dockerfile_installs_the_project_and_enters_the_cli():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert text.splitlines()[3].startswith("FROM nvidia/cuda:")
    entry = [ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT")]
    assert entry and json.loads(entry[0].split(None, 1)[1]) == ["timellm-job"]
    for folder in ("jobs", "storage", "trainer", "orchestrator"):
        assert f"COPY {folder} ./{folder}" in text
    assert re.search(r"torch==\d", text) and re.search(r"bitsandbytes==\d", text)


def test_startup_script_and_skypilot_task_run_submit():
    startup = (REPO / "docker" / "gce-startup.sh").read_text()
    assert "submit /var/lib/timellm-job/spec/job.yaml" in startup and "--stop-timeout 30" in startup
    task = yaml.safe_load((REPO / "docker" / "skypilot-task.yaml").read_text())
    assert task["resources"]["use_spot"] is True
    assert "timellm-job submit job.yaml" in task["run"]
    readme_code = "\n".join((REPO / "docker" / "README.md").read_text().split("```")[1::2])
    for text in (task["run"], readme_code):  # the startup script runs the image: "$IMAGE" submit
        assert used_commands(text) and set(used_commands(text)) <= COMMANDS


def test_colab_notebook_parses_and_its_job_is_a_valid_spec(tmp_path):
    nb = json.loads((REPO / "examples" / "colab.ipynb").read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]]
    spec_cell = next(s for s in sources if s.startswith("%%writefile"))
    spec = tmp_path / "etth1.yaml"
    spec.write_text(spec_cell.split("\n", 1)[1])
    from timellm_job.jobs import load_spec

    loaded = load_spec(spec)
    assert loaded.model.quantization == "nf4" and loaded.storage.root.startswith("/content/drive")
    # it runs on a T4 as written: every memory field is planned on the card
    assert (loaded.model.compute_dtype, loaded.train.micro_batch_size, loaded.train.gradient_checkpointing) == \
        ("auto", "auto", "auto")
    for s in sources:
        for line in s.splitlines():
            if line.startswith("!timellm-job") and not line.startswith("!timellm-job --"):
                args = shlex.split(line[1:])
                assert args[1] in COMMANDS
                # each command line parses (arguments and options exist), without running it
                result = CliRunner().invoke(main, [args[1], "--help"])
                assert result.exit_code == 0
                for opt in [a for a in args[2:] if a.startswith("--")]:
                    assert opt in result.output, (line, opt)


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(tool("hadolint")), "--no-color", "docker/Dockerfile"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_skypilot_loads_the_task_with_its_cloud_and_the_hf_token_secret():
    code = """
import json, sys, sky
task = sky.Task.from_yaml(sys.argv[1])
(res,) = task.resources
given = sky.Task.from_yaml_config(__import__("yaml").safe_load(open(sys.argv[1])),
                                  secrets_overrides=[("HF_TOKEN", "hf_example")])
print(json.dumps({"cloud": str(res.cloud), "accelerators": res.accelerators, "spot": res.use_spot,
                  "required": [r.name for r in task.managed_secret_refs],
                  "given": given.secrets["HF_TOKEN"].get_secret_value(), "envs": task.envs}))
"""
    result = tools_python(code, str(REPO / "docker" / "skypilot-task.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads(result.stdout.strip().splitlines()[-1])
    assert task["cloud"] == "GCP" and task["accelerators"] == {"T4": 1} and task["spot"] is True
    assert task["required"] == ["HF_TOKEN"] and task["given"] == "hf_example"
    assert "HF_TOKEN" not in task["envs"]  # a secret, never a plain env var


def test_the_notebook_passes_nbformats_strict_validation_and_runs_as_written():
    # the raw document against the 4.5 schema, no extra properties, nothing repaired (nbformat.read
    # would add missing cell ids and hide the errors a strict reader reports)
    code = """
import json, sys, warnings
import nbformat
from nbformat.validator import get_validator
warnings.simplefilter("error")  # nbformat only warns of a missing cell id: a strict reader refuses it
with open(sys.argv[1]) as f:
    nb = json.load(f)
errors = [e.message for e in get_validator(version=4, version_minor=5).iter_errors(nb)]
assert not errors, errors
nbformat.validate(nb, relax_add_props=False)
print(len(nb["cells"]))
"""
    result = tools_python(code, str(REPO / "examples" / "colab.ipynb"))
    assert result.returncode == 0, result.stderr[-3000:]
    nb = json.loads((REPO / "examples" / "colab.ipynb").read_text())
    assert all(c.get("id") for c in nb["cells"]) and len({c["id"] for c in nb["cells"]}) == len(nb["cells"])
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    text = "\n".join(code)
    assert "YOUR-ORG" not in text
    # the install source: one variable, at the top of the first code cell, used by the install
    assert code[0].lstrip().splitlines()[0].startswith("#")
    assignments = re.findall(r"^TIMELLM_JOB_SOURCE = ", text, re.MULTILINE)
    assert len(assignments) == 1 and "TIMELLM_JOB_SOURCE = " in code[0]
    assert any('pip install -q "{TIMELLM_JOB_SOURCE}"' in c for c in code)
    # every folder the notebook writes into is created before it is written
    written = next(i for i, c in enumerate(code) if c.startswith("%%writefile"))
    target = Path(code[written].splitlines()[0].split()[1]).parent
    assert any(f"'{target}'" in c and "os.makedirs(" in c for c in code[:written])


def test_gce_startup_passes_the_hf_token_through_the_environment_only():
    text = (REPO / "docker" / "gce-startup.sh").read_text()
    assert "gcloud secrets versions access latest" in text and "$META/hf-token" in text
    run_line = text[text.index("exec docker run"):]
    assert "-e HF_TOKEN " in run_line and "HF_TOKEN=" not in run_line  # no value on the command line
    result = subprocess.run(["bash", "-n", str(REPO / "docker" / "gce-startup.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_wheel_installs_one_namespace_and_no_generic_top_level_module(tmp_path):
    """pip puts timellm_job/{jobs,storage,trainer,orchestrator} into site-packages, never a
    top-level ``jobs`` or ``storage`` that a user's own module would collide with; the entry
    point and every module the folders hold are in the wheel, and installed it imports."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("timellm_job-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"timellm_job"}, top
    sources = {f"timellm_job/{path.relative_to(REPO).as_posix()}" for folder in ("jobs", "storage", "trainer", "orchestrator")
               for path in (REPO / folder).rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "timellm-job = timellm_job.orchestrator.cli:main" in entry
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = subprocess.run([sys.executable, "-I", "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u;"
                            "import timellm_job.orchestrator.cli, timellm_job.jobs.spec;"
                            "assert timellm_job.jobs.spec.__file__.startswith(sys.argv[1]);"
                            "print([n for n in ('jobs','storage','trainer','orchestrator') if u.find_spec(n)])",
                            str(unpacked)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
