"""What can be checked of the packaging without a Docker engine or a cloud: the files parse, the
image's entry point is the CLI, and every timellm-job command they run is a real subcommand."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from orchestrator.cli import main

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
    from jobs import load_spec

    loaded = load_spec(spec)
    assert loaded.model.quantization == "nf4" and loaded.storage.root.startswith("/content/drive")
    # it runs on a T4 as written: every memory field is planned on the card
    assert (loaded.model.compute_dtype, loaded.train.micro_batch_size, loaded.train.gradient_checkpointing) == \
        ("auto", "auto", "auto")
    for s in sources:
        for line in s.splitlines():
            if line.startswith("!timellm-job"):
                args = shlex.split(line[1:])
                assert args[1] in COMMANDS
                # each command line parses (arguments and options exist), without running it
                result = CliRunner().invoke(main, [args[1], "--help"])
                assert result.exit_code == 0
                for opt in [a for a in args[2:] if a.startswith("--")]:
                    assert opt in result.output, (line, opt)
