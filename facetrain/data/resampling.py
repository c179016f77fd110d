"""Repeat-factor sampling of rare classes (LVIS, Gupta et al. 2019), as a seeded epoch plan.

Each class c gets r_c = max(1, sqrt(t / f_c)), where f_c = K_c / N is the fraction of training
images of class c (single-label data: LVIS's "fraction of images that contain c") and t is
`data.repeat_factor_threshold`. Classes rarer than t are repeated; the others keep r = 1. Each
image of the class appears floor(r_c) times in an epoch, plus once more with probability
frac(r_c), so an epoch holds about sum_i r_i images instead of N.

The extra copies are drawn by systematic sampling over a seeded random order of the images:
one uniform offset u, and image j gets an extra copy when an integer lies in
[S_{j-1} - u, S_j - u), where S_j is the running sum of the fractional parts. Each image then
gets its extra copy with probability exactly frac(r_j), as with independent coin flips, but the
total number of extras is floor(F) or floor(F) + 1 for F = sum_j frac(r_j). So every epoch has
the same length (the plan is cut to N_plan = sum_j floor(r_j) + floor(F) - 1, at most two
entries dropped at random), and len(loader) and the step count stay fixed, as the schedule
and resume need.

The global plan depends only on (seed, epoch), never on the world size: ranks take it
rank-strided exactly as the plain plan (base.py), so a mid-epoch resume on any number of ranks
continues from the same global position.
"""
from __future__ import annotations

import numpy as np


def class_repeat_factors(class_counts: np.ndarray, threshold: float) -> np.ndarray:
    """r_c = max(1, sqrt(t / f_c)) per class, float64 [C]; classes with no images get 1."""
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    freq = counts / max(counts.sum(), 1.0)
    with np.errstate(divide="ignore"):
        r = np.sqrt(threshold / np.where(freq > 0, freq, np.inf))
    return np.maximum(1.0, r)


def image_repeat_factors(labels: np.ndarray, class_counts: np.ndarray,
                         threshold: float) -> np.ndarray:
    """Each image's repeat factor (its class's), float64 [N]."""
    return class_repeat_factors(class_counts, threshold)[np.asarray(labels, np.int64)]


def plan_size(repeats: np.ndarray) -> int:
    """Images in every epoch's plan: sum floor(r) + floor(sum frac(r)) - 1 (never below N).
    The -1 absorbs rounding in the running sums, so every epoch's draw has at least this many."""
    floors = np.floor(repeats)
    extras = int(np.floor(float((repeats - floors).sum())))
    return int(floors.sum()) + max(0, extras - 1)


def repeat_factor_epoch(repeats: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The global plan of `epoch`: dataset positions int64 [plan_size(repeats)], shuffled.
    A function of (repeats, seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch, 0x5EED, 0x2EF])
    n = repeats.size
    floors = np.floor(repeats).astype(np.int64)
    order = rng.permutation(n)
    running = np.cumsum((repeats - floors)[order])
    hits = np.ceil(running - rng.random())                       # integers below S_j - u
    extra = np.diff(np.concatenate([[0.0], hits])).clip(0, 1).astype(np.int64)
    copies = floors.copy()
    copies[order] += extra
    expanded = np.repeat(np.arange(n, dtype=np.int64), copies)
    size = plan_size(repeats)
    if expanded.size < size:        # cannot happen (see plan_size); a loud stop if it does
        raise RuntimeError(f"repeat-factor plan drew {expanded.size} < {size} images")
    return rng.permutation(expanded)[:size]


def repeat_factor_rank_indices(repeats: np.ndarray, rank: int, world_size: int,
                               batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's positions for `epoch`: the global plan taken rank-strided and cut to whole
    batches, the same rule as base.epoch_indices. int64 [batches * batch_size]."""
    plan = repeat_factor_epoch(repeats, seed, epoch)
    batches = (plan.size // world_size) // batch_size
    return plan[rank::world_size][:batches * batch_size]
