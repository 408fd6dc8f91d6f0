#!/usr/bin/env bash
# The whole test suite: installs timellm-job with its test extras into .venv, then runs pytest.
# The tests start the servers they need on 127.0.0.1 (gcp-storage-emulator, moto_server) and
# stop them; nothing else is contacted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup-tools.sh  # SkyPilot, hadolint, nbformat for tests/test_packaging.py
exec .venv/bin/python -m pytest -q --durations=25 "$@"
