"""Effective-number class weights (Cui et al. 2019): values, normalisation, limits, config."""
import numpy as np
import pytest

from facetrain.config import ConfigError, load_config
from facetrain.heads.class_weights import class_weight_table, effective_number_weights


def test_weights_follow_the_effective_number_and_average_one():
    counts = np.array([22, 22, 3, 3, 3])
    w = effective_number_weights(counts, 0.99)
    raw = np.array([(1 - 0.99) / (1 - 0.99 ** k) for k in counts])
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-12)
    assert w.mean() == pytest.approx(1.0) and w.sum() == pytest.approx(counts.size)
    # A 3-image class weighs E(22)/E(3) = (1 - .99^22) / (1 - .99^3) ~ 6.7x a 22-image class.
    assert w[2] / w[0] == pytest.approx((1 - 0.99 ** 22) / (1 - 0.99 ** 3), rel=1e-12)


def test_limits_and_off():
    counts = np.array([100, 10, 1])
    np.testing.assert_array_equal(effective_number_weights(counts, 0.0), np.ones(3))
    assert class_weight_table(counts, 0.0, "cpu") is None
    # beta -> 1: inverse class frequency.
    w = effective_number_weights(counts, 1 - 1e-9)
    inv = 1.0 / counts
    np.testing.assert_allclose(w, inv / inv.mean(), rtol=1e-5)
    # An empty class id gets 0 and does not enter the mean.
    w = effective_number_weights(np.array([4, 0, 2]), 0.9)
    assert w[1] == 0 and w[[0, 2]].mean() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        effective_number_weights(counts, 1.0)


def test_config_field():
    assert load_config(None).head.class_balance_beta == 0.0
    assert load_config(None, ["head.class_balance_beta=0.999"]).head.class_balance_beta == 0.999
    with pytest.raises(ConfigError, match="head.class_balance_beta"):
        load_config(None, ["head.class_balance_beta=1.0"])
