#!/usr/bin/env bash
# The README's main command: set up from nothing (venv, Python deps, font packages), then build
# the embedded glyph benchmark, train CosFace and LEAP under torchrun on CPU, evaluate, report.
# Extra arguments go to experiments/main_job.py (e.g. --seeds 0,1,2 --methods cosface,leap_full).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --fonts
. .venv/bin/activate
python -m experiments.main_job "$@"
