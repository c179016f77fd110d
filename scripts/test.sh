#!/usr/bin/env bash
# The README's test command: set up from nothing, then run the whole test suite.
# Only GPU-marked tests may skip (no CUDA here); any other skip fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --fonts
bash scripts/mxnet_venv.sh     # side venv with the real mxnet for tests/interop
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
