"""Class-balanced loss (head.class_balance_beta) in the class-sharded head on 1 and 2 gloo ranks
against an independent float64 single-process reference written from Cui et al.'s formula:
loss = mean_n w_{y_n} CE_n with w_c = (1 - beta) / (1 - beta^K_c) scaled to sum C over classes.
Loss, embedding gradients and classifier-weight gradients; CosFace and ArcFace; class sampling
on and off."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import gather_head_classes_and_weight, run_spawn
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.heads.partial_fc import PartialFC

C, D, B = 41, 8, 6                        # 41 classes: blocks 21/20 on 2 ranks
COUNTS = np.r_[np.full(5, 40), np.full(C - 5, 3)]       # 5 head classes, 36 three-image classes
BETA = 0.99
MARGINS = [MarginConfig("cosface", 16.0, 0.3, 0.0), MarginConfig("arcface", 16.0, 0.0, 0.3)]


def reference_weights(counts, beta: float) -> torch.Tensor:
    """Cui et al. Eq.: (1 - beta) / (1 - beta^n), then scaled so the C weights sum to C."""
    raw = [(1.0 - beta) / (1.0 - beta ** int(n)) for n in counts]
    total = sum(raw)
    return torch.tensor([r * len(raw) / total for r in raw], dtype=torch.float64)


def reference_weighted_loss(emb, weight, labels, margin: MarginConfig, cw) -> torch.Tensor:
    """float64 full softmax with the margin on the target: mean over n of w[y_n] * CE_n."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if margin.kind == "cosface":
        tgt = cos - margin.m_cos
    else:
        tgt = torch.cos(torch.clamp(theta + margin.m_arc, 0, math.pi))
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    logits = margin.scale * torch.where(onehot, tgt, cos)
    ce = -torch.log_softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return (cw[labels] * ce).mean()


def _batch(step: int, n: int):
    g = torch.Generator().manual_seed(500 + step)
    emb = torch.randn(n, D, generator=g)
    # Head and tail classes both in every batch (head class ids are 0..4).
    labels = torch.randint(0, C, (n,), generator=g)
    labels[::3] = torch.randint(0, 5, (labels[::3].numel(),), generator=g)
    return emb, labels


def _check(ctx) -> None:
    n = B * ctx.world_size
    sl = slice(ctx.rank * B, (ctx.rank + 1) * B)
    cw = reference_weights(COUNTS, BETA)
    for i, margin in enumerate(MARGINS):
        for rate in (1.0, 0.5):
            head = PartialFC(D, COUNTS, HeadConfig(rate, margin, class_balance_beta=BETA),
                             LeapConfig(mode="off"), ctx, seed=2).train()
            emb, labels = _batch(i, n)
            local = emb[sl].clone().requires_grad_()
            loss = head(local, labels[sl])
            loss.backward()
            cls, full_w = gather_head_classes_and_weight(head, sampled=rate < 1.0)
            w = full_w[cls].clone().requires_grad_()
            e = emb.double().requires_grad_()
            ref = reference_weighted_loss(e, w, torch.searchsorted(cls, labels), margin, cw[cls])
            ref.backward()
            tag = f"{margin.kind} rate={rate} ws={ctx.world_size}"
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6, msg=tag)
            torch.testing.assert_close(local.grad.double(), e.grad[sl], rtol=1e-4, atol=1e-6,
                                       msg=tag)
            gw = torch.zeros(C, D, dtype=torch.float64)
            gw[cls] = w.grad
            scale = gw.abs().max()
            torch.testing.assert_close(head.weight.grad.double() / scale,
                                       gw[head.start:head.end] / scale, rtol=1e-4, atol=1e-6,
                                       msg=tag)
            # The weighting changes the loss: unweighted, the same batch gives another value.
            plain = PartialFC(D, COUNTS, HeadConfig(rate, margin), LeapConfig(mode="off"), ctx,
                              seed=2).train()
            if rate == 1.0:
                assert abs(float(plain(emb[sl], labels[sl])) - float(loss)) > 1e-3, tag


@pytest.mark.parametrize("world_size", [1, 2])
def test_class_balanced_loss_matches_float64_reference(world_size):
    run_spawn(_check, world_size)
