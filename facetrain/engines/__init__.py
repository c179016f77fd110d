"""Training engines: how the backbone's gradients are reduced and its optimizer is stepped.

`ddp` (default): the backbone under DistributedDataParallel. `deepspeed`: the backbone under a
DeepSpeed engine with ZeRO stage 1/2 partitioning its optimizer state. In both, the classifier
(`PartialFC`) stays model-parallel outside the wrapper, with its own optimizer over this rank's
class rows. Both expose the same small surface to the trainer (see `DDPEngine`).
"""
from __future__ import annotations

from typing import Any

import torch

from facetrain.config import Config
from facetrain.dist import DistContext


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


def check_engine(cfg: Config, ctx: DistContext) -> None:
    """Raise ConfigError for an engine setting this machine cannot run, before any collective
    (the engines themselves start with collectives: DDP's parameter broadcast)."""
    if cfg.train.engine == "deepspeed":
        from facetrain.engines.deepspeed_engine import check_precision

        check_precision(cfg, ctx)


def build_engine(cfg: Config, ctx: DistContext, backbone: torch.nn.Module,
                 head: torch.nn.Module) -> Any:
    """The engine named by `cfg.train.engine` (deepspeed is imported only when asked for)."""
    if cfg.train.engine == "deepspeed":
        from facetrain.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx, backbone, head)
    from facetrain.engines.ddp import DDPEngine

    return DDPEngine(cfg, ctx, backbone, head)
