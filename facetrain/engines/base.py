"""What every engine shares: the `Engine` protocol the trainer uses, the embedding-gradient
scaling, the precision dtypes, and the classifier optimizer's checkpoint state (saved per rank,
re-split with its classes on a world-size change)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Dict, List, Protocol, Tuple

import torch

# train.precision -> the autocast / input dtype (fp32: none).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    """What the trainer needs from an engine (DDPEngine, DeepSpeedEngine)."""

    name: str
    backbone: torch.nn.Module            # the bare module (for export and evaluation)

    @property
    def optimizers(self) -> List[Any]:
        """Every optimizer whose learning rate the schedule sets."""

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; the detached global mean loss. sync=False
        on all but the last micro-batch of an optimizer step."""

    def step(self) -> None:
        """Reduce, clip and step every optimizer; zero the gradients."""

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """{"replicated": saved once (rank 0), "shard": saved by every rank}."""

    def load_state_dict(self, states: Sequence[Dict[str, Dict[str, Any]]],
                        world_size: int) -> None:
        """Restore from `states[r]`, what saved rank r's `state_dict()` returned, for
        `world_size` ranks now. `states` may be lazy: an engine reads only the entries it needs
        (its own rank's when len(states) == world_size, unless it needs every partition)."""

    def close(self, finished: bool) -> None:
        """Release what the engine created beyond its own objects (process groups, hooks),
        while the interpreter is fully alive. finished=True when every rank ended the run
        normally (a collective release is then safe); False after an error on this rank."""


class Entries(Sequence):
    """`states[r][key]` for every r of a (possibly lazy) sequence, each read on access."""

    def __init__(self, states: Sequence[Dict[str, Any]], key: str) -> None:
        self.states, self.key = states, key

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, r):  # type: ignore[override]
        return self.states[r][self.key]


def head_optimizer_state(opt: torch.optim.Optimizer, head: torch.nn.Module) -> Dict[str, Any]:
    """The classifier shard's optimizer state with what resharding it needs: the dim-0 size of
    each head parameter and the shard's class block (keys as in every checkpoint so far)."""
    return {"head_optim": opt.state_dict(),
            "head_param_rows": [p.shape[0] for p in head.parameters()],
            "class_range": (int(head.start), int(head.end))}


def load_head_optimizer_state(opt: torch.optim.Optimizer, head: torch.nn.Module,
                              shards: Sequence[Dict[str, Any]], rank: int,
                              world_size: int) -> None:
    """Load `head_optimizer_state` parts saved by len(shards) ranks into this rank's optimizer:
    its own part when the world size is unchanged, else every part re-split by class."""
    if len(shards) == world_size:
        opt.load_state_dict(shards[rank]["head_optim"])
    else:
        opt.load_state_dict(reshard_optimizer_state(list(shards),
                                                    (int(head.start), int(head.end))))


def reshard_optimizer_state(shards: Sequence[Dict[str, Any]], new_range: Tuple[int, int]
                            ) -> Dict[str, Any]:
    """Re-split the classifier shards' optimizer states for the class block `new_range`.

    Each shard holds `head_optim` (a torch optimizer state_dict), `head_param_rows` (dim-0 size
    of each head parameter) and `class_range` (start, end). A state tensor whose dim 0 equals its
    parameter's class count is a per-class row block (SGD momentum, Adam moments): the blocks
    are concatenated in class order and sliced, so each momentum row moves with its class.
    Anything else (Adam's step counter) is taken from shard 0.
    """
    shards = sorted(shards, key=lambda s: s["class_range"][0])
    start, end = new_range
    base = shards[0]["head_optim"]
    out_state: Dict[int, Dict[str, Any]] = {}
    for idx in range(len(shards[0]["head_param_rows"])):
        names = set()
        for s in shards:
            names.update(s["head_optim"]["state"].get(idx, {}).keys())
        entry: Dict[str, Any] = {}
        for name in sorted(names):
            parts, row_sharded = [], True
            for s in shards:
                rows = s["head_param_rows"][idx]
                val = s["head_optim"]["state"].get(idx, {}).get(name)
                if not (torch.is_tensor(val) and val.dim() >= 1 and val.shape[0] == rows
                        and rows == s["class_range"][1] - s["class_range"][0]):
                    row_sharded = False
                    break
                parts.append(val)
            if row_sharded:
                entry[name] = torch.cat(parts, 0)[start:end].clone()
            else:
                entry[name] = base["state"].get(idx, {}).get(name)
        if entry:
            out_state[idx] = entry
    return {"state": out_state, "param_groups": base["param_groups"]}




class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def undo_gradient_averaging(embeddings: torch.Tensor, world_size: int) -> torch.Tensor:
    """Scale the embeddings' gradient by the world size.

    The classifier returns every rank the exact gradient of the GLOBAL-batch mean loss w.r.t. its
    own embeddings, so the backbone gradients of the ranks must be SUMMED; DDP and DeepSpeed
    average them (divide by world size). Multiplying here, on [B, D] per rank, is cheaper than a
    second pass over the backbone's gradients and works unchanged for both engines.
    """
    if world_size == 1:
        return embeddings
    return _ScaleGrad.apply(embeddings, float(world_size))
