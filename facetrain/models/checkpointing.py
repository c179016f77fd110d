"""Activation checkpointing of one block that leaves BatchNorm statistics as a plain run's.

`torch.utils.checkpoint` runs a block's forward a second time during the backward pass. The
outputs and gradients are the same (the RNG state is replayed too), but a BatchNorm in training
mode would update its running mean/variance and batch counter a second time, so the running
statistics - the ones evaluation uses - would drift from an uncheckpointed run's. The recompute
here restores the BatchNorm buffers it touched, so a checkpointed step changes exactly what a
plain step changes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _keep_batchnorm_buffers(module: nn.Module) -> Iterator[None]:
    saved: List[Tuple[torch.Tensor, torch.Tensor]] = [
        (buf, buf.clone()) for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x), storing only x for the backward pass and recomputing the rest there."""
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(),
                                          _keep_batchnorm_buffers(block)))
