#!/usr/bin/env bash
# The whole test suite: installs timellm-job with its test extras into .venv, then runs pytest.
# The tests start the servers they need on 127.0.0.1 (gcp-storage-emulator, moto_server) and
# stop them; nothing else is contacted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup-tools.sh  # SkyPilot, hadolint, nbformat for tests/test_packaging.py
# two test files at once (pytest-xdist; a file's tests stay together, so its module fixtures are
# built once), the long ones first (tests/conftest.py); each process runs one intra-op thread
# (tests/conftest.py), so the two do not spin against each other on 2 cores. Arguments go to
# pytest: `-n 0` runs one file at a time.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
