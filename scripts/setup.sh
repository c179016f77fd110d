#!/usr/bin/env bash
# Set up facetrain from nothing: a virtual environment in .venv with every Python dependency,
# and (with --fonts) the Debian font packages the embedded glyph dataset is rendered from.
#   FACETRAIN_TORCH  torch requirement to install when torch is missing (default torch==2.13.0,
#                    the CPU build; GPU machines: install your CUDA torch in .venv first, or set
#                    FACETRAIN_TORCH=torch)
set -euo pipefail
cd "$(dirname "$0")/.."
want_fonts=0
for arg in "$@"; do
  case "$arg" in
    --fonts) want_fonts=1 ;;
    *) echo "setup.sh: unknown argument $arg (known: --fonts)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${FACETRAIN_TORCH:-torch==2.13.0}"
  python -m pip install -q "${FACETRAIN_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing facetrain with extras all,dev"
DS_BUILD_OPS=0 python -m pip install -q -e ".[all,dev]"

if [ "$want_fonts" = 1 ]; then
  pkgs=""
  [ -f data_tools/glyph_fonts.py ] && pkgs=$(python data_tools/glyph_fonts.py --missing-packages)
  if [ -n "$pkgs" ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "[setup] installing font packages: $pkgs"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
    else
      echo "[setup] missing font packages (run as root): sudo apt-get install $pkgs" >&2
      exit 1
    fi
  fi
fi
echo "[setup] done: $(python -c 'import torch, facetrain; print("torch", torch.__version__, "facetrain", facetrain.__version__)')"
