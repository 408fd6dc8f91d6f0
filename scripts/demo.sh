#!/usr/bin/env bash
# The demo: install, then train the tiny Time-LLM job on ETTh1 with a SIGKILL of the trainer and
# a SIGTERM preemption in the middle, resume it, show its status and export the best model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot  # the demo draws its loss curve (status --plot)
exec .venv/bin/python scripts/demo.py "$@"
