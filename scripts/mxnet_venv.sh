#!/usr/bin/env bash
# Side virtual environment .venv-mxnet with the real mxnet 1.9.1, for tests/interop: our
# RecordIO codec is checked against mxnet's own reader and writer. It cannot live in .venv:
# mxnet 1.9.1 imports only with numpy < 1.24 (numpy 1.23.5 has Python 3.11 wheels, not 3.12+).
# Built once; later calls return at once (a stamp file records what was installed).
#   FACETRAIN_MXNET_PYTHON  Python <= 3.11 to build it with (default python3)
# mxnet's libmxnet.so needs the system's libgomp.so.1 and libquadmath.so.0 (Debian/Ubuntu:
# apt-get install libgomp1 libquadmath0).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-mxnet
REQS="mxnet==1.9.1 numpy==1.23.5 opencv-python-headless==4.8.1.78"
STAMP=$VENV/facetrain-requirements.txt

up_to_date() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQS" ]; }
up_to_date && exit 0

exec 9>".venv-mxnet.lock"           # one builder at a time (parallel test runs)
flock 9
up_to_date && exit 0

PY=${FACETRAIN_MXNET_PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))'; then
  echo "mxnet_venv.sh: $("$PY" --version) is too new for numpy 1.23.5 (mxnet 1.9.1 needs it);" \
       "set FACETRAIN_MXNET_PYTHON to a Python 3.10 or 3.11" >&2
  exit 1
fi
echo "[mxnet_venv] creating $VENV ($REQS) with $("$PY" --version)"
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -m pip install -q $REQS > "$VENV/pip.log" 2>&1; then
  grep -v "is ignored: it is neither" "$VENV/pip.log" | tail -n 20 >&2
  echo "mxnet_venv.sh: pip could not install $REQS (full log: $VENV/pip.log)" >&2
  exit 1
fi
if ! err=$("$VENV/bin/python" -c 'import cv2, mxnet.recordio' 2>&1); then
  echo "$err" | tail -n 3 >&2
  echo "mxnet_venv.sh: mxnet does not import in $VENV; if a shared library is missing, install" \
       "libgomp1 and libquadmath0 (apt-get install libgomp1 libquadmath0), then rerun" >&2
  exit 1
fi
echo "$REQS" > "$STAMP"
echo "[mxnet_venv] done in $(( $(date +%s) - start )) s"
