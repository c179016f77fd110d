"""Experiment controls for LEAP's feature cloud, matched to LEAP in strength.

Why matched: a control that adds more noise than LEAP cannot tell "more noise helps" from
"targeting does not help". A sample of class i is drawn K_i / sum_j K_j of the time, so the
expected per-sample noise variance of a cloud with class variances v_i is
sum_i K_i v_i / sum_i K_i. Every matched control keeps the numerator equal to LEAP's,
T = sum over the classes LEAP perturbs of K_i * gap_i, over the same set of classes (those with
valid statistics), so the expected per-sample variance is LEAP's exactly.

All functions are O(C) per statistics refresh (not per step) and identical on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Keeps the shuffled control's seeds of successive refreshes apart (a large odd number).
_REFRESH_STRIDE = 1_000_003


def matched_uniform(valid: torch.Tensor, target: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """One shared variance T / sum_{valid} K_i for every class with valid stats ([C_local]).

    valid [C_local] bool; target, k_valid: global 0-d float64 (T and sum of K_i over valid)."""
    shared = torch.where(k_valid > 0, target / k_valid.clamp(min=1e-300), torch.zeros_like(target))
    return shared * valid


def shuffle_order(num_classes: int, seed: int, refresh: int, valid: torch.Tensor) -> torch.Tensor:
    """A random permutation of the valid classes of the GLOBAL index space ([C] int64, dest ->
    source): out[dest[k]] takes in[src[k]], both lists valid-first, so invalid classes map to
    themselves. Drawn on a CPU generator seeded by (seed, refresh) alone, so every rank of any
    world size draws the same one; fixed shapes, no host sync on the valid count."""
    gen = torch.Generator().manual_seed((seed * _REFRESH_STRIDE + refresh) % (2 ** 63))
    keys = torch.rand(num_classes, generator=gen, dtype=torch.float64).to(valid.device)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))
    src = torch.argsort(keys, stable=True)                        # valid in random order first
    dest = torch.argsort((~valid).to(torch.int8), stable=True)    # valid in index order first
    perm = torch.empty_like(src)
    perm[dest] = src
    return perm


def shuffled(gap: torch.Tensor, valid: torch.Tensor, start: int, all_counts: torch.Tensor,
             target: torch.Tensor, seed: int, refresh: int,
             group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """LEAP's per-class variances permuted over the classes with valid stats, scaled by one
    factor so that sum K_i v_i = T ([C_local] float64, this rank's classes).

    gap [C_local] float64: LEAP's variance of each owned class (0 for a valid class LEAP does not
    perturb); valid [C_local]; all_counts [C] global K_i. One all-reduce of a C-long vector: each
    rank fills its own classes (gap, or -1 for "no valid stats") and zeros elsewhere."""
    c = gap.shape[0]
    full = torch.zeros(all_counts.shape[0], dtype=torch.float64, device=gap.device)
    full[start:start + c] = torch.where(valid, gap, torch.full_like(gap, -1.0))
    if group is not None:
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    g_valid = full >= 0
    moved = full.clamp(min=0)[shuffle_order(full.shape[0], seed, refresh, g_valid)]
    denom = (all_counts.to(moved) * moved).sum()
    scale = torch.where(denom > 0, target / denom.clamp(min=1e-300), torch.zeros_like(denom))
    return (moved * scale)[start:start + c]
