"""The main job's LEAP noise-strength table, from the runs' metrics.jsonl."""
from __future__ import annotations

import json

import pytest

from experiments.evaluation import format_noise_markdown, noise_strengths


def _run(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for step, row in enumerate(rows, 1):
            fh.write(json.dumps({"step": step, "loss": 1.0, **row}) + "\n")
    return path


def test_noise_strengths_average_active_rows_then_seeds(tmp_path):
    off = {"leap_active": 0.0, "leap_noise_var": 0.0, "leap_target_noise_var": 0.0,
           "leap_batch_noise_var": 0.0, "leap_mean_abs_alpha": 0.0}
    def on(v, a):
        return {"leap_active": 1.0, "leap_noise_var": v, "leap_target_noise_var": v,
                "leap_batch_noise_var": v, "leap_mean_abs_alpha": a}
    runs = {"cosface": {0: _run(tmp_path / "c0", [{"leap_active": 0.0}] * 3)},
            "leap_full": {0: _run(tmp_path / "l0", [off, on(0.01, 0.02), on(0.03, 0.04)]),
                          1: _run(tmp_path / "l1", [on(0.04, 0.06)])}}
    got = noise_strengths(runs)
    assert list(got) == ["leap_full"]                      # the baseline never had a cloud
    assert got["leap_full"]["leap_noise_var"] == pytest.approx((0.02 + 0.04) / 2)
    assert got["leap_full"]["leap_mean_abs_alpha"] == pytest.approx((0.03 + 0.06) / 2)
    md = format_noise_markdown(got)
    assert "| leap_full | 0.03 |" in md and "mean abs(alpha)" in md
    assert format_noise_markdown({}) == ""
