"""Softmax cross-entropy over logits split by class blocks across a process group.

Each rank holds the logits of its own classes for the whole global batch. The softmax needs
the row max and the row sum over ALL classes: two all-reduces of [B] vectors (max, then sum
packed with the target logit). The loss is the mean over the global batch and is replicated;
backward needs no communication, because every rank's block gradient (softmax - one_hot) / B
depends only on its own block and the reduced row statistics. Each rank back-propagates only
through its own block, so there is no factor of world size in the gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _DistSoftmaxCE(torch.autograd.Function):
    """Hand-written instead of torch's cross_entropy because the normaliser spans ranks."""

    @staticmethod
    def forward(ctx, logits, target_col, is_local, group, weight=None):  # type: ignore[override]
        # logits [B, C_s] fp32 (this rank's class block); target_col [B] (valid column everywhere);
        # is_local [B] bool: the sample's class is in this block; weight [B] or None: per-sample
        # loss weights (class-balanced loss), the same on every rank.
        row_max = logits.detach().max(dim=1).values
        if group is not None:
            # Row max over all blocks, for a numerically safe exp.
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (logits.detach() - row_max.unsqueeze(1)).exp_()
        tgt = logits.detach().gather(1, target_col.view(-1, 1)).squeeze(1)
        packed = torch.stack([probs.sum(dim=1), torch.where(is_local, tgt, torch.zeros_like(tgt))])
        if group is not None:
            # Row sums of exp and the target logit (non-zero on exactly one rank), in one call.
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        denom, tgt_all = packed[0], packed[1]
        ce = denom.log() + row_max - tgt_all
        loss = (ce if weight is None else ce * weight).mean()
        probs.div_(denom.unsqueeze(1))
        ctx.save_for_backward(probs, target_col, is_local, weight)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("dist_softmax_cross_entropy's backward reuses its softmax buffer in "
                               "place and cannot run twice; do not use retain_graph=True on it")
        ctx.used = True
        probs, target_col, is_local, weight = ctx.saved_tensors
        # In place on the saved softmax to avoid another [B, C_s] buffer: w (p - one_hot) / B.
        grad = probs
        grad.scatter_add_(1, target_col.view(-1, 1), -is_local.to(grad.dtype).view(-1, 1))
        grad.mul_(grad_loss / probs.shape[0])
        if weight is not None:
            grad.mul_(weight.view(-1, 1))
        return grad, None, None, None, None


def dist_softmax_cross_entropy(logits: torch.Tensor, target_col: torch.Tensor,
                               is_local: torch.Tensor, group: Optional[dist.ProcessGroup],
                               sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy over the global batch (same value on every rank of `group`).

    logits [B, C_s] (this rank's classes, fp32; cast here if not), target_col [B] int64 column
    of the target in this block (ignored where is_local is False), is_local [B] bool.
    group None = a single process holding every class. sample_weight [B] (identical on every
    rank; no gradient): the loss becomes sum_n w_n CE_n / B, a plain mean of weighted losses as
    in Cui et al.'s class-balanced loss (not divided by sum_n w_n).
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    if sample_weight is not None:
        sample_weight = sample_weight.detach().to(torch.float32)
    return _DistSoftmaxCE.apply(logits, target_col, is_local, group, sample_weight)
