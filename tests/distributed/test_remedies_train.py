"""The long-tail remedies in the trainer (one process): a repeat-factor run stopped mid-epoch
and resumed repeats the uninterrupted loss sequence, with the longer epoch the plan implies;
a class-balanced run trains with finite, falling loss."""
from __future__ import annotations

import numpy as np

from test_train_data import make_tiny_rec, tiny_config
from facetrain.dist import single_process
from facetrain.logging_utils import read_metrics
from facetrain.trainer import Trainer


def _losses(out) -> np.ndarray:
    m = read_metrics(out / "metrics.jsonl")
    return np.array([m[k]["loss"] for k in sorted(m)])


def test_repeat_factor_run_resumes_exactly_and_class_balanced_trains(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    extra = ["data.repeat_factor_threshold=0.1", "train.epochs=2", "leap.mode=off"]
    a = Trainer(tiny_config(rec, tmp_path / "a", extra), single_process())
    # 120 images; 4-image classes r = sqrt(3), 8-image ones sqrt(1.5): a longer epoch.
    assert a.loader.plan_images > 130 and a.steps_per_epoch == a.loader.plan_images // 4
    a.fit()
    b = tmp_path / "b"
    Trainer(tiny_config(rec, b, extra), single_process()).fit(stop_after=a.steps_per_epoch + 3)
    Trainer(tiny_config(rec, b, extra), single_process()).fit()
    la, lb = _losses(tmp_path / "a"), _losses(b)
    assert len(la) == 2 * a.steps_per_epoch
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
    assert "resumed from" in (b / "log.txt").read_text()

    c = tmp_path / "c"
    Trainer(tiny_config(rec, c, ["head.class_balance_beta=0.9", "train.epochs=2"]),
            single_process()).fit()
    lc = _losses(c)
    assert np.isfinite(lc).all() and lc[-10:].mean() < lc[:5].mean()
