"""Contiguous class blocks per rank, and splitting/joining per-class block state.

Rank r of W owns classes [bounds[r], bounds[r+1]); the first C % W ranks get one extra class, so
uneven class counts are normal. The same rule is used for the weights, the LEAP state and
checkpoints, which is what lets `reshard` move any N blocks to M blocks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch


def partition_bounds(num_classes: int, world_size: int) -> List[int]:
    """[W+1] class boundaries; block r is [bounds[r], bounds[r+1])."""
    if num_classes < world_size:
        raise ValueError(f"cannot split {num_classes} classes over {world_size} ranks: every rank "
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


def route_to_block(labels: torch.Tensor, start: int, num_local: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row [N], is_local [N]) of global class ids `labels` [N] in the block [start, start +
    num_local): the row of each local class, and for a class owned elsewhere ("not mine") always
    num_local, one past the block: the scratch row the per-class buffers keep for it. Fixed
    shapes, no host sync: samples of other blocks are routed, not filtered out; every reader
    masks them with is_local."""
    local = (labels >= start) & (labels < start + num_local)
    return torch.where(local, labels - start, torch.full_like(labels, num_local)), local


def logit_column(row: torch.Tensor, is_local: torch.Tensor) -> torch.Tensor:
    """The target column in a [N, num_local] logit block, which has no scratch column: a routed
    row, with "not mine" (num_local) mapped to column 0, an in-range column every reader masks
    with is_local."""
    return torch.where(is_local, row, torch.zeros_like(row))


def concat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join per-block tensors whose dim 0 is the class (in rank order)."""
    return torch.cat([p.detach().cpu() for p in parts], dim=0)


def split_rows(full: torch.Tensor, bounds: Sequence[int]) -> List[torch.Tensor]:
    """Split a [C, ...] tensor into contiguous blocks at `bounds` (clones, so blocks don't alias)."""
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
    """Blocks must tile [0, num_classes) in order; name the first one that doesn't."""
    expect = 0
    for i, (lo, hi) in enumerate(ranges):
        if lo != expect or hi < lo:
            raise ValueError(f"block state {i} covers classes [{lo}, {hi}) but [{expect}, ...) was "
                             "expected: pass every rank's state_dict() in rank order")
        expect = hi
    if expect != num_classes:
        raise ValueError(f"block states cover classes [0, {expect}) but num_classes is "
                         f"{num_classes}: a block is missing; pass every rank's state_dict()")


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


def reshard_optimizer_state(parts: Sequence[Dict[str, Any]], world_size: int
                            ) -> List[Dict[str, Any]]:
    """Re-split a classifier optimizer's state, saved per rank, into `world_size` class blocks.

    Each part is what `PartialFC.optimizer_state` saved: `head_optim` (a torch optimizer
    state_dict), `head_param_rows` (dim-0 size of each head parameter) and `class_range`
    (start, end). A state tensor whose dim 0 is its parameter's class count in every part is a
    per-class row block (SGD momentum, Adam moments) and moves with its classes through
    `reshard_tree`, as the rows and the LEAP state do; anything else (Adam's step counter) is
    taken from the part of the first class block. Parts may come in any order.
    """
    if not parts:
        raise ValueError("reshard_optimizer_state: no optimizer states given; pass every rank's "
                         "saved classifier optimizer state")
    parts = sorted(parts, key=lambda s: s["class_range"][0])
    ranges = [tuple(s["class_range"]) for s in parts]
    check_contiguous(ranges, ranges[-1][1])
    bounds = partition_bounds(ranges[-1][1], world_size)
    first = parts[0]["head_optim"]
    flat: List[Dict[str, torch.Tensor]] = [{} for _ in parts]
    rest: Dict[Tuple[int, str], Any] = {}
    for idx in range(len(parts[0]["head_param_rows"])):
        names = sorted({n for s in parts for n in s["head_optim"]["state"].get(idx, {})})
        for name in names:
            vals = [s["head_optim"]["state"].get(idx, {}).get(name) for s in parts]
            if all(_is_row_block(v, s["head_param_rows"][idx], s["class_range"])
                   for v, s in zip(vals, parts)):
                for f, v in zip(flat, vals):
                    f[f"{idx}/{name}"] = v
            else:
                rest[(idx, name)] = first["state"].get(idx, {}).get(name)
    blocks = reshard_tree(flat, bounds, list(flat[0]), {})
    outs = []
    for block in blocks:
        state: Dict[int, Dict[str, Any]] = {}
        for key, val in block.items():
            idx, name = key.split("/", 1)
            state.setdefault(int(idx), {})[name] = val
        for (idx, name), val in rest.items():
            state.setdefault(idx, {})[name] = val
        outs.append({"state": {i: dict(sorted(e.items())) for i, e in sorted(state.items())},
                     "param_groups": first["param_groups"]})
    return outs


def _is_row_block(value: Any, rows: int, block: Tuple[int, int]) -> bool:
    """True for a tensor with one row per class of its parameter's class block."""
    return (torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows
            and rows == block[1] - block[0])
