"""Contiguous class blocks per rank, and splitting/joining per-class shard state.

Rank r of W owns classes [bounds[r], bounds[r+1]); the first C % W ranks get one extra class, so
uneven class counts are normal. The same rule is used for the weights, the LEAP state and
checkpoints, which is what lets `reshard` move any N shards to M shards.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def partition_bounds(num_classes: int, world_size: int) -> List[int]:
    """[W+1] class boundaries; block r is [bounds[r], bounds[r+1])."""
    if num_classes < world_size:
        raise ValueError(f"cannot shard {num_classes} classes over {world_size} ranks: every rank "
                         "needs at least one class; use fewer ranks in the classifier group")
    base, extra = divmod(num_classes, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def class_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """(start, end) of the classes rank `rank` owns."""
    b = partition_bounds(num_classes, world_size)
    return b[rank], b[rank + 1]


def route_to_shard(labels: torch.Tensor, start: int, num_local: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row [N], is_local [N]) of global class ids `labels` [N] in the block [start, start +
    num_local): the row of each local class, and for a class owned elsewhere ("not mine") always
    num_local, one past the block: the scratch row the per-class buffers keep for it. Fixed
    shapes, no host sync: samples of other shards are routed, not filtered out; every reader
    masks them with is_local."""
    local = (labels >= start) & (labels < start + num_local)
    return torch.where(local, labels - start, torch.full_like(labels, num_local)), local


def logit_column(row: torch.Tensor, is_local: torch.Tensor) -> torch.Tensor:
    """The target column in a [N, num_local] logit block, which has no scratch column: a routed
    row, with "not mine" (num_local) mapped to column 0, an in-range column every reader masks
    with is_local."""
    return torch.where(is_local, row, torch.zeros_like(row))


def concat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join per-shard tensors whose dim 0 is the class (in shard order)."""
    return torch.cat([p.detach().cpu() for p in parts], dim=0)


def split_rows(full: torch.Tensor, bounds: Sequence[int]) -> List[torch.Tensor]:
    """Split a [C, ...] tensor into contiguous blocks at `bounds` (clones, so shards don't alias)."""
    return [full[bounds[r]:bounds[r + 1]].clone() for r in range(len(bounds) - 1)]


def split_ragged(flat: torch.Tensor, sizes: torch.Tensor, bounds: Sequence[int]) -> List[torch.Tensor]:
    """Split a flat per-class ragged buffer (class i holds sizes[i] entries, in class order)."""
    ends = torch.cumsum(sizes.to(torch.int64), 0)
    starts = ends - sizes.to(torch.int64)
    out = []
    for r in range(len(bounds) - 1):
        lo, hi = bounds[r], bounds[r + 1]
        a = int(starts[lo]) if hi > lo else 0
        b = int(ends[hi - 1]) if hi > lo else 0
        out.append(flat[a:b].clone())
    return out


def check_contiguous(ranges: Sequence[Tuple[int, int]], num_classes: int) -> None:
    """Shards must tile [0, num_classes) in order; name the first one that doesn't."""
    expect = 0
    for i, (lo, hi) in enumerate(ranges):
        if lo != expect or hi < lo:
            raise ValueError(f"shard state {i} covers classes [{lo}, {hi}) but [{expect}, ...) was "
                             "expected: pass every rank's state_dict() in rank order")
        expect = hi
    if expect != num_classes:
        raise ValueError(f"shard states cover classes [0, {expect}) but num_classes is "
                         f"{num_classes}: a shard is missing; pass every rank's state_dict()")


def reshard_tree(states: Sequence[Dict], bounds: Sequence[int], keys_rows: Sequence[str],
                 ragged: Dict[str, str]) -> List[Dict[str, torch.Tensor]]:
    """Re-split the per-class tensors `keys_rows` (and ragged buffers keyed by their size tensor)."""
    outs: List[Dict[str, torch.Tensor]] = [{} for _ in range(len(bounds) - 1)]
    for key in keys_rows:
        for r, t in enumerate(split_rows(concat_rows([s[key] for s in states]), bounds)):
            outs[r][key] = t
    for key, size_key in ragged.items():
        flat = concat_rows([s[key] for s in states])
        sizes = concat_rows([s[size_key] for s in states])
        for r, t in enumerate(split_ragged(flat, sizes, bounds)):
            outs[r][key] = t
    return outs
