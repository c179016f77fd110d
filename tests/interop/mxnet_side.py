"""Run code under the real mxnet 1.9.1 (the side venv .venv-mxnet built by
scripts/mxnet_venv.sh), so tests can use mxnet as the oracle for our RecordIO codec.

mxnet cannot be imported in the main venv (it needs numpy < 1.24), hence a subprocess. A missing
venv is built here (once, ~20 s) instead of skipping: the suite turns skips into failures.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-mxnet"
SCRIPT = REPO / "scripts" / "mxnet_venv.sh"
STAMP = VENV / "facetrain-requirements.txt"


def mxnet_python() -> Path:
    """The side venv's python; builds the venv with scripts/mxnet_venv.sh if it is missing."""
    if not STAMP.is_file():
        r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"could not build {VENV} with {SCRIPT} (exit {r.returncode}):\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return VENV / "bin" / "python"


def run_mxnet(code: str, cwd: Path, **params: Any) -> Any:
    """Run `code` under mxnet in `cwd`; `params` arrive as the dict P (JSON); the code stores its
    answer (JSON-able) in R, which is returned."""
    prog = ("import json, sys\nP = json.loads(sys.argv[1])\nR = None\n"
            + textwrap.dedent(code)
            + "\nopen('mx_result.json', 'w').write(json.dumps(R))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_ENGINE_TYPE="NaiveEngine")
    env.pop("PYTHONPATH", None)                      # keep facetrain's numpy 2 out of mxnet's way
    r = subprocess.run([str(mxnet_python()), "-c", prog, json.dumps(params)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"mxnet snippet failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads((Path(cwd) / "mx_result.json").read_text())
