"""The packaging checkers and SkyPilot, from their own venv (.venv-tools, scripts/setup-tools.sh):
SkyPilot's pins clash with the project's (click), so it never shares the project's venv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".venv-tools" / "bin"  # scripts/setup-tools.sh: SkyPilot, hadolint, nbformat


def tool(name: str) -> Path:
    """A packaging checker from .venv-tools; CI installs them (scripts/test.sh), so there a
    missing one fails; elsewhere the test is skipped with how to install it."""
    path = TOOLS / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: scripts/setup-tools.sh installs it")
        pytest.skip(f"{path} is missing: run scripts/setup-tools.sh")
    return path


def tools_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool("python")), "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
                                         "HOME": os.environ.get("HOME", "/tmp")})


