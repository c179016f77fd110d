"""The default engine: backbone under DDP, classifier block outside it, optional AMP.

One optimizer for the replicated backbone (its state is saved once, by rank 0) and one for this
rank's classifier rows (saved per rank, re-split with the classes on a world-size change).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from facetrain.config import Config
from facetrain.dist import DistContext
from facetrain.engines.base import (PRECISION_DTYPES, Classifier, Entries,
                                    undo_gradient_averaging)
from facetrain.optim import build_head_optimizer, build_optimizer

class DDPEngine:
    """Forward/backward/step for one rank.

    backbone: replicated module (wrapped in DDP when the context is distributed);
    head: the model-parallel classifier, called as `head(embeddings [B, D], labels [B]) -> loss`
    (the global-batch mean, identical on every rank).
    """

    name = "ddp"

    def __init__(self, cfg: Config, ctx: DistContext, backbone: torch.nn.Module,
                 head: Classifier) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.backbone, self.head = backbone, head
        self._ddp: DistributedDataParallel | None = None
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(backbone, device_ids=ids, process_group=ctx.group)
        self.model: torch.nn.Module = self._ddp if self._ddp is not None else backbone
        if cfg.model.compile:
            # Compiling the DDP wrapper lets dynamo split graphs at DDP's bucket boundaries.
            self.model = torch.compile(self.model)
        self.backbone_opt = build_optimizer(cfg.optim, backbone.parameters())
        self.head_opt = build_head_optimizer(cfg, head.parameters())
        self.dtype = PRECISION_DTYPES.get(cfg.train.precision)
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(ctx.device.type,
                                           enabled=cfg.train.precision == "fp16")

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.backbone_opt, self.head_opt]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.dtype)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached global mean loss.

        sync=False skips DDP's gradient all-reduce (all but the last micro-batch of a step).
        The loss is divided by optim.grad_accum so the summed gradient is the mean over the
        step's samples, whatever the accumulation factor.
        """
        no_sync = self._ddp is not None and not sync
        with self._ddp.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                emb = self.model(images)
                emb = undo_gradient_averaging(emb, self.ctx.world_size)
                loss = self.head(emb, labels)
            self.scaler.scale(loss / self.cfg.optim.grad_accum).backward()
        return loss.detach()

    def _poison_head_grads_on_any_overflow(self) -> None:
        """fp16: make a non-finite gradient on ANY rank's classifier block skip the classifier
        step on every rank and back off every rank's scale. Each rank's GradScaler sees only
        its own block; without this the ranks' scales would drift apart. (The backbone's
        gradient is replicated, so its skip decision is already the same everywhere.)"""
        grads = []
        for p in self.head.parameters():
            if p.grad is not None and p.grad.is_sparse:
                # head.update_rows=sampled: check and poison the values (a view once coalesced).
                p.grad = p.grad.coalesce()
                grads.append(p.grad._values())
            elif p.grad is not None:
                grads.append(p.grad)
        if not grads or not self.ctx.distributed:
            return
        bad = torch.zeros((), device=self.ctx.device)
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        # MAX over ranks: one overflowing block marks the step for everyone (no host sync).
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.ctx.group)
        poison = torch.where(bad > 0, torch.tensor(float("nan"), device=bad.device),
                             torch.zeros((), device=bad.device))
        for g in grads:
            g.add_(poison.to(g.dtype))

    def step(self) -> None:
        """Unscale (fp16), clip the backbone's gradient norm, step both optimizers, zero grads.

        Clipping covers the backbone only (as InsightFace does): its gradient is replicated, so
        the norm is the same on every rank without another collective.
        """
        if self.scaler.is_enabled():
            self._poison_head_grads_on_any_overflow()
        self.scaler.unscale_(self.backbone_opt)
        self.scaler.unscale_(self.head_opt)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.backbone_opt)
        self.scaler.step(self.head_opt)
        self.scaler.update()
        self.backbone_opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)

    def close(self, finished: bool) -> None:
        """Nothing to release: DDP communicates over the caller's group, which the caller
        owns (and destroys, e.g. with `facetrain.dist.finish`)."""

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Replicated: backbone weights, its optimizer, the grad scaler. Per rank: the
        classifier block's optimizer."""
        return {"replicated": {"backbone": self.backbone.state_dict(),
                               "backbone_optim": self.backbone_opt.state_dict(),
                               "scaler": self.scaler.state_dict()},
                "shard": self.head.optimizer_state(self.head_opt)}

    def load_state_dict(self, states: Sequence[Dict[str, Dict[str, Any]]],
                        world_size: int) -> None:
        """See `Engine.load_state_dict`; reads only this rank's entry on the same world size."""
        rank = self.ctx.rank if len(states) == world_size else 0
        rep = states[rank]["replicated"]
        self.backbone.load_state_dict(rep["backbone"])
        if "backbone_optim" in rep:
            self.backbone_opt.load_state_dict(rep["backbone_optim"])
        if rep.get("scaler"):
            self.scaler.load_state_dict(rep["scaler"])
        self.head.load_optimizer_state(self.head_opt, Entries(states, "shard"), world_size)

