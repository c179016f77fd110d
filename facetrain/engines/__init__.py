"""Training engines: how the backbone's gradients are reduced and its optimizer is stepped.

`ddp` (default): the backbone under DistributedDataParallel. `deepspeed`: the backbone under a
DeepSpeed engine with ZeRO stage 1/2 partitioning its optimizer state. In both, the classifier
(`PartialFC`) stays model-parallel outside the wrapper, with its own optimizer over this rank's
class rows. Both expose the same small surface to the trainer (see `DDPEngine`).
"""
from __future__ import annotations

import torch

from facetrain.config import Config
from facetrain.dist import DistContext
from facetrain.engines.base import (PRECISION_DTYPES, Classifier, Engine,
                                    undo_gradient_averaging)

__all__ = ["Classifier", "Engine", "PRECISION_DTYPES", "build_engine", "check_engine",
           "undo_gradient_averaging"]


def check_engine(cfg: Config, ctx: DistContext) -> None:
    """Raise ConfigError for an engine setting this machine cannot run, before any collective
    (the engines themselves start with collectives: DDP's parameter broadcast)."""
    if cfg.train.engine == "deepspeed":
        from facetrain.engines.deepspeed_engine import check_precision

        check_precision(cfg, ctx)


def build_engine(cfg: Config, ctx: DistContext, backbone: torch.nn.Module,
                 head: Classifier) -> Engine:
    """The engine named by `cfg.train.engine` (deepspeed is imported only when asked for)."""
    if cfg.train.engine == "deepspeed":
        from facetrain.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx, backbone, head)
    from facetrain.engines.ddp import DDPEngine

    return DDPEngine(cfg, ctx, backbone, head)
