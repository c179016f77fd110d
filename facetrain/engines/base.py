"""What every engine shares: the `Engine` protocol the trainer uses, the embedding-gradient
scaling and the precision dtypes. (The classifier optimizer's checkpoint state is laid out and
re-split by the classifier: `PartialFC.optimizer_state` / `load_optimizer_state`.)"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Dict, List, Protocol

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


class Classifier(Protocol):
    """What the engines need from the model-parallel classifier (PartialFC) besides being a
    module called as `head(embeddings [B, D], labels [B]) -> loss`: the layout of its rows'
    optimizer state, which it saves and re-splits by class itself."""

    def parameters(self) -> Any:
        """The rows (and any other parameters) its optimizer steps."""

    def optimizer_state(self, opt: torch.optim.Optimizer) -> Dict[str, Any]:
        """`opt`'s state for this rank's checkpoint part."""

    def load_optimizer_state(self, opt: torch.optim.Optimizer, parts: Sequence[Dict[str, Any]],
                             world_size: int) -> None:
        """Load the parts saved by len(parts) ranks into `opt`, for `world_size` ranks now."""


class Entries(Sequence):
    """`states[r][key]` for every r of a (possibly lazy) sequence, each read on access."""

    def __init__(self, states: Sequence[Dict[str, Any]], key: str) -> None:
        self.states, self.key = states, key

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, r):  # type: ignore[override]
        return self.states[r][self.key]


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
