"""benchmarks/backbone_bench.py keeps working on CPU (the GPU numbers come from the same code)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "backbone_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("backbone_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cli_prints_a_table_and_writes_json(tmp_path: Path, capsys) -> None:
    bench = _load()
    out = tmp_path / "rows.json"
    rows = bench.main(["--batch-size", "4", "8", "--steps", "2", "--warmup", "1",
                       "--precision", "bf16", "--channels-last", "--json", str(out)])
    assert [r.batch_size for r in rows] == [4, 8]
    assert all(r.samples_per_s > 0 and r.peak_mem_gib > 0 for r in rows)
    table = capsys.readouterr().out
    assert "| tiny | 8 | 32 | bf16 | True | False | cpu |" in table
    assert [r["batch_size"] for r in json.loads(out.read_text())] == [4, 8]


def test_bad_precision_is_an_error() -> None:
    with pytest.raises(ValueError, match="--precision must be one of"):
        _load().bench(precision="int8")
