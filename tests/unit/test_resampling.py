"""Repeat-factor sampling (data.repeat_factor_threshold): the LVIS factors, exact repeat counts
for integer factors, expected counts for fractional ones, a fixed epoch length, one global plan
for every world size, mid-epoch resume through the torch loader, and DALI refused."""
import numpy as np
import pytest
import torch

from facetrain.build.writer import write_insightface_dataset
from facetrain.config import ConfigError, DataConfig, load_config
from facetrain.data import build_train_loader
from facetrain.data.resampling import (class_repeat_factors, plan_size, repeat_factor_epoch,
                                       repeat_factor_rank_indices)
from facetrain.dist import DistContext

from test_loaders import colour_image


def test_lvis_factors():
    counts = np.array([20, 20, 5, 5])                 # N = 50: f = 0.4, 0.4, 0.1, 0.1
    r = class_repeat_factors(counts, 0.4)
    np.testing.assert_allclose(r, [1.0, 1.0, 2.0, 2.0])          # sqrt(0.4 / 0.1) = 2
    np.testing.assert_allclose(class_repeat_factors(counts, 0.9), [1.5, 1.5, 3.0, 3.0])
    np.testing.assert_allclose(class_repeat_factors(counts, 0.01), np.ones(4))
    assert class_repeat_factors(np.array([3, 0]), 0.5)[1] == 1.0  # an empty class id


def test_integer_factors_repeat_exactly():
    repeats = np.array([1, 2, 3, 1, 4, 2] * 5, np.float64)
    assert plan_size(repeats) == repeats.sum()
    plans = [repeat_factor_epoch(repeats, seed=7, epoch=e) for e in range(3)]
    for plan in plans:
        np.testing.assert_array_equal(np.bincount(plan, minlength=repeats.size), repeats)
    assert not np.array_equal(plans[0], plans[1])                # reshuffled per epoch
    np.testing.assert_array_equal(plans[2], repeat_factor_epoch(repeats, seed=7, epoch=2))


def test_fractional_factors_in_expectation_with_a_fixed_length():
    repeats = np.repeat([1.0, 1.25, 1.5, 2.7, 3.1], 60)
    floors = np.floor(repeats)
    size = plan_size(repeats)
    total = np.zeros(repeats.size)
    epochs = 400
    for e in range(epochs):
        plan = repeat_factor_epoch(repeats, seed=3, epoch=e)
        assert plan.size == size
        got = np.bincount(plan, minlength=repeats.size)
        assert (got <= floors + 1).all()                  # floor(r) or floor(r) + 1 copies,
        assert np.maximum(floors - got, 0).sum() <= 2     # less at most two cut at the end
        total += got
    mean = (total / epochs).reshape(5, 60).mean(axis=1)   # per factor group
    # Expected copies: r, scaled by the tiny cut (size / sum r); 300 images x 400 epochs.
    expect = np.array([1.0, 1.25, 1.5, 2.7, 3.1]) * size / repeats.sum()
    np.testing.assert_allclose(mean, expect, atol=0.01)


def test_one_global_plan_for_every_world_size():
    repeats = np.repeat([1.0, 1.6, 2.3], [40, 30, 30])
    plan = repeat_factor_epoch(repeats, seed=1, epoch=4)
    for world in (1, 2, 3, 4):
        ranks = np.stack([repeat_factor_rank_indices(repeats, r, world, 5, 1, 4)
                          for r in range(world)])
        # Rank r holds global entries r, r + W, ...: interleaved they are the plan's prefix.
        assert ranks.shape[1] % 5 == 0
        np.testing.assert_array_equal(ranks.T.reshape(-1), plan[:ranks.size])
        assert plan.size - ranks.size < world * 5 + world      # only a partial batch left out


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("resampling")
    counts = [18] + [2] * 7                           # N = 32: f = 18/32, then 1/16 x 7
    items = [(c, colour_image(c, i, 16)) for c, n in enumerate(counts) for i in range(n)]
    write_insightface_dataset(d / "train", items, len(counts), 16)
    return str(d / "train")


def _loader(rec, rank, world, batch, t=9 / 16):
    cfg = DataConfig(rec=rec, loader="torch", batch_size=batch, num_workers=0, image_size=16,
                     random_flip=False, repeat_factor_threshold=t)
    return build_train_loader(cfg, DistContext(rank, world, 0, torch.device("cpu"), None, None),
                              seed=5)


def test_torch_loader_serves_the_plan_and_resumes(rec):
    # t = 9/16: r = sqrt(9) = 3 for the 2-image classes, 1 for the 18-image one: 18 + 42 = 60.
    ld = _loader(rec, 0, 1, 6)
    assert ld.plan_images == 60 and len(ld) == 10
    labels = torch.cat([y for _, y in ld]).numpy()
    np.testing.assert_array_equal(np.bincount(labels, minlength=8), [18] + [6] * 7)
    ld.set_epoch(3)
    full = [y.tolist() for _, y in ld]
    assert [y.tolist() for _, y in ld.iter_from(4)] == full[4:]        # mid-epoch resume
    ld.close()
    # 2 ranks x 3 after 2 batches each (12 global samples) -> 1 rank x 6 from its batch 2: the
    # trainer's cross-world-size resume rule continues the same global sequence.
    two = [_loader(rec, r, 2, 3) for r in range(2)]
    for x in two:
        x.set_epoch(3)
    seen = [[y.tolist() for _, y in x] for x in two]
    interleaved = [lab for b in range(len(seen[0])) for pair in zip(seen[0][b], seen[1][b])
                   for lab in pair]
    assert interleaved == sum(full, [])
    # Off: the plain plan is untouched.
    plain = _loader(rec, 0, 1, 6, t=0.0)
    assert plain.repeats is None and len(plain) == 5
    np.testing.assert_array_equal(np.bincount(torch.cat([y for _, y in plain]).numpy(),
                                              minlength=8) <= [18] + [2] * 7, True)
    for x in (*two, plain):
        x.close()


def test_config_field_and_dali_refused():
    assert load_config(None).data.repeat_factor_threshold == 0.0
    with pytest.raises(ConfigError, match="data.loader=torch"):
        load_config(None, ["data.repeat_factor_threshold=0.01", "data.loader=dali"])
    with pytest.raises(ConfigError, match="data.repeat_factor_threshold"):
        load_config(None, ["data.repeat_factor_threshold=-1"])
