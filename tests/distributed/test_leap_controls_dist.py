"""LEAP's controls on 1, 2 and 3 gloo processes: matched in strength, and world-size independent.

The class statistics are set directly (per class variance, some classes without valid stats),
so the expected values follow from Eq. 9 / Eq. 6 in a few lines of numpy here. Checked for every
control and two widths: sum over valid classes of K_i * var_i equals LEAP's sum of K_i * gap_i
(times leap.width_scale); `uniform` is one shared variance; `shuffled` is a scaled permutation of
LEAP's variances over the valid classes, redrawn at each refresh and identical for any world
size; the realised noise in leap_summary matches the batch.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _helpers import run_spawn
from facetrain.config import HeadConfig, LeapConfig
from facetrain.heads.partial_fc import PartialFC

C, D = 101, 8
COUNTS = np.random.RandomState(1).randint(1, 60, size=C)
VAR = np.random.RandomState(2).uniform(0.0, 0.1, size=C)
NO_STATS = (np.arange(C) % 7 == 3) | (COUNTS < 2)       # classes without valid statistics
THRESHOLD = 30


def _expected_gap(mode: str) -> np.ndarray:
    """LEAP's per-class variance from Eq. 9 (full) or Eq. 6 (vanilla), float64."""
    valid = ~NO_STATS
    head = COUNTS > THRESHOLD
    w = (head & valid) * 1.0 if mode == "vanilla" else (COUNTS - 1) * valid
    pooled = (w * VAR).sum() / w.sum()
    perturb = valid & (VAR < pooled) & (~head if mode == "vanilla" else True)
    return np.where(perturb, pooled - VAR, 0.0)


def _head(ctx, mode: str, control: str, lam: float) -> PartialFC:
    cfg = LeapConfig(mode=mode, control=control, width_scale=lam, head_threshold=THRESHOLD,
                     update_interval=10**6)
    head = PartialFC(D, COUNTS, HeadConfig(), cfg, ctx, seed=4).train()
    leap = head.leap
    with torch.no_grad():
        mine = slice(head.start, head.end)
        n = torch.where(torch.as_tensor(NO_STATS[mine]), torch.zeros(head.num_local, dtype=torch.int64),
                        torch.minimum(leap.mem_size[:-1], torch.full((head.num_local,), 20)))
        leap.count[:-1] = n
        leap.sum[:-1] = 0.0                # rings with sum 0 and the chosen unbiased variance
        leap.sumsq[:-1] = torch.as_tensor(VAR[mine]) * (n - 1).clamp(min=0)
    return head


def _global_var(head) -> np.ndarray:
    parts = [None] * head.ctx.world_size
    dist.all_gather_object(parts, head.leap.class_std[:-1].double().numpy() ** 2)
    return np.concatenate(parts)


def _worker(ctx, out_dir) -> None:
    valid = ~NO_STATS
    for mode in ("full", "vanilla"):
        gap = _expected_gap(mode)
        strength = (COUNTS * gap).sum()
        assert strength > 0 and (gap[valid] == 0).any()
        for lam in (1.0, 2.5):
            for control in ("none", "uniform", "shuffled"):
                head = _head(ctx, mode, control, lam)
                tag = f"{mode} {control} lambda={lam} ws={ctx.world_size}"
                seen = []
                for refresh in range(3):
                    head.leap.refresh(ctx.group)
                    v = _global_var(head)
                    # The matching identity: the same expected per-sample noise variance.
                    np.testing.assert_allclose((COUNTS * v).sum(), lam * strength, rtol=1e-6, err_msg=tag)
                    assert (v[~valid] == 0).all(), tag
                    summ = head.leap_summary()
                    assert summ["noise_var"] == pytest.approx(summ["target_noise_var"], rel=1e-12), tag
                    assert summ["target_noise_var"] == pytest.approx(
                        lam * strength / COUNTS[valid].sum(), rel=1e-9), tag
                    if control == "none":
                        np.testing.assert_allclose(v, lam * gap, rtol=1e-6, atol=1e-12, err_msg=tag)
                    elif control == "uniform":
                        np.testing.assert_allclose(v[valid], lam * strength / COUNTS[valid].sum(),
                                                   rtol=1e-6, err_msg=tag)
                    else:
                        # A scaled permutation of LEAP's variances over the valid classes.
                        scale = v.max() / gap.max()
                        np.testing.assert_allclose(np.sort(v[valid]), np.sort(gap[valid] * scale),
                                                   rtol=1e-5, atol=1e-12, err_msg=tag)
                        assert not np.allclose(v, lam * gap), tag
                        seen.append(v)
                        if ctx.rank == 0:
                            np.save(os.path.join(out_dir, f"shuffled_{mode}_{lam}_{refresh}_ws"
                                                 f"{ctx.world_size}.npy"), v)
                if seen:
                    assert not np.allclose(seen[0], seen[1]), f"{tag}: not redrawn at refresh"
                _check_realised(ctx, head, v, tag)


def _check_realised(ctx, head, v: np.ndarray, tag: str) -> None:
    """leap_summary's realised noise: the batch's mean cloud variance, and |alpha| > 0."""
    g = torch.Generator().manual_seed(7)
    n = 4 * ctx.world_size
    labels = torch.randint(0, C, (n,), generator=g)
    emb = torch.randn(n, D, generator=g)
    sl = slice(ctx.rank * 4, (ctx.rank + 1) * 4)
    head.leap_summary()                     # reset the window
    head(emb[sl], labels[sl])
    summ = head.leap_summary()
    assert summ["batch_noise_var"] == pytest.approx(v[labels.numpy()].mean(), rel=1e-5), tag
    assert (summ["mean_abs_alpha"] > 0) == bool(v[labels.numpy()].max() > 0), tag


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("controls"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_controls_are_matched_and_world_size_independent(world_size, out_dir):
    ref = os.path.join(out_dir, "shuffled_full_1.0_0_ws1.npy")
    if world_size > 1 and not os.path.exists(ref):
        run_spawn(_worker, 1, out_dir)
    run_spawn(_worker, world_size, out_dir)
    if world_size > 1:
        for name in sorted(os.listdir(out_dir)):
            if name.endswith("_ws1.npy"):
                mine = np.load(os.path.join(out_dir, name.replace("_ws1", f"_ws{world_size}")))
                np.testing.assert_allclose(mine, np.load(os.path.join(out_dir, name)), rtol=1e-6,
                                           atol=0, err_msg=name)
