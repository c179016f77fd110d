"""The sharded head with a feature cloud against the paper's Eq. 7 / Eq. 8, on 1, 2 and 3 ranks.

The reference below is written from the paper in float64 and shares no code with the margins:
for sample n of class y with angle alpha_{n,j} (one per logit, or one per sample),

  Eq. 7 (CosFace)  target s * (cos(clip(theta_y + alpha_y, 0, pi)) - m_c)
  Eq. 8 (ArcFace)  target s * cos(clip(theta_y + alpha_y + m_a, 0, pi))
  both             other  s * cos(clip(theta_j + alpha_j, 0, pi))

and the loss is the mean softmax cross-entropy. Every class gets a non-zero cloud std, so
alpha is non-zero on the target and on every other logit. The alphas are the head's own: its
noise is a pure function of (seed, draw counter, sample, global class id)
(facetrain/heads/noise.py), so the reference re-draws them from the counter the head used.
Loss and gradients (embeddings and classifier weights) must agree to 1e-5.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _helpers import run_spawn
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.heads import noise
from facetrain.heads.partial_fc import PartialFC

C, D, B = 53, 16, 4                        # 53 classes: blocks 27/26 and 18/18/17
COUNTS = np.random.RandomState(3).randint(1, 40, size=C)
STD = 0.05 + 0.3 * ((np.arange(C) * 0.37) % 1.0)      # every class perturbed, all different
MARGINS = [MarginConfig("cosface", 64.0, 0.35, 0.0), MarginConfig("arcface", 64.0, 0.0, 0.5)]


def paper_loss(emb, weight, labels, alpha, margin: MarginConfig):
    """Eq. 7 / Eq. 8 in float64. emb [N, D], weight [C', D], labels [N] in [0, C'),
    alpha [N, C'] or [N, 1]."""
    f = emb / emb.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    theta = torch.acos((f @ w.T).clamp(-1.0, 1.0))
    a = alpha.expand_as(theta)
    other = margin.scale * torch.cos(torch.clamp(theta + a, 0.0, math.pi))
    if margin.kind == "cosface":
        target = margin.scale * (torch.cos(torch.clamp(theta + a, 0.0, math.pi)) - margin.m_cos)
    else:
        target = margin.scale * torch.cos(torch.clamp(theta + a + margin.m_arc, 0.0, math.pi))
    onehot = torch.zeros_like(theta, dtype=torch.bool)
    onehot[torch.arange(len(labels)), labels] = True
    logits = torch.where(onehot, target, other)
    return (torch.logsumexp(logits, dim=1) - logits[onehot]).mean()


def _batch(ctx, step: int):
    """Global batch: random embeddings and labels (a third are pulled near their class weight
    in _check, so theta_y + alpha_y < 0 happens and the clip at 0 is exercised)."""
    n = B * ctx.world_size
    g = torch.Generator().manual_seed(500 + step)
    labels = torch.randint(0, C, (n,), generator=g)
    emb = torch.randn(n, D, generator=g)
    return emb, labels


def _gather(ctx, t: torch.Tensor) -> torch.Tensor:
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, t.detach().numpy())
    return torch.as_tensor(np.concatenate(parts))


def _check(ctx, margin: MarginConfig, gran: str, rate: float, step: int) -> None:
    cfg = LeapConfig(mode="full", update_interval=10**6, alpha_granularity=gran)
    head = PartialFC(D, COUNTS, HeadConfig(rate, margin), cfg, ctx, seed=11).train()
    with torch.no_grad():
        head.leap.class_std[:-1] = torch.as_tensor(STD[head.start:head.end], dtype=torch.float32)
        head.weight.copy_(F.normalize(head.weight, dim=1))    # unit rows: gradients of order s
    head.leap_steps = 1                    # no centre update or refresh inside the step
    emb, labels = _batch(ctx, step)
    weight_full = _gather(ctx, head.weight).double()
    with torch.no_grad():                  # pull some samples close to their class weight
        near = torch.arange(len(labels)) % 3 == 0
        emb[near] = (F.normalize(weight_full[labels[near]], dim=1).float() * 4.0
                     + 0.15 * torch.randn(int(near.sum()), D, generator=torch.Generator().manual_seed(step)))
    sl = slice(ctx.rank * B, (ctx.rank + 1) * B)
    counter = int(head.noise_counter)
    local = emb[sl].clone().requires_grad_()
    loss = head(local, labels[sl])
    loss.backward()
    cls = torch.arange(C)
    if rate < 1.0:
        cls = torch.sort(_gather(ctx, head.last_sample_index + head.start)).values
        assert len(cls) < C and torch.isin(labels, cls).all()
    # The reference's alphas: the head's noise for this draw, times each sample's class std.
    ids = None if gran == "sample" else cls
    row_key, col_key = noise.noise_keys(head._noise_seed, torch.tensor(counter), len(labels), ids)
    z = noise.gauss(row_key, col_key).double()
    alpha = torch.as_tensor(STD, dtype=torch.float64)[labels].unsqueeze(1) * z
    assert (alpha != 0).all()
    theta_y = torch.acos(F.cosine_similarity(emb.double(), weight_full[labels], dim=1))
    clipped = int(((theta_y + alpha.expand(-1, len(cls)).gather(
        1, torch.searchsorted(cls, labels).view(-1, 1)).view(-1)) < 0).sum())
    w = weight_full[cls].clone().requires_grad_()
    e = emb.double().requires_grad_()
    ref = paper_loss(e, w, torch.searchsorted(cls, labels), alpha, margin)
    ref.backward()
    tag = f"{margin.kind} alpha per {gran} rate={rate} ws={ctx.world_size}"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, msg=tag)
    gw = torch.zeros(C, D, dtype=torch.float64)
    gw[cls] = w.grad
    # Gradients to 1e-5 of their largest entry (float32 with s = 64 resolves ~1e-6 of it).
    for name, mine, full in (("embeddings", local.grad, e.grad[sl]),
                             ("weights", head.weight.grad, gw[head.start:head.end])):
        err = (mine.double() - full).abs().max() / e.grad.abs().max().clamp(min=1e-12) \
            if name == "embeddings" else (mine.double() - full).abs().max() / gw.abs().max()
        assert err < 1e-5, f"{tag}: {name} gradient differs by {float(err):.3g} of its scale"
    return clipped


def _worker(ctx) -> None:
    step = clipped = 0
    for margin in MARGINS:
        for gran in ("logit", "sample"):
            for rate in (1.0, 0.4):
                clipped += _check(ctx, margin, gran, rate, step)
                step += 1
    assert clipped > 0, "no target angle reached the clip at 0"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_feature_cloud_matches_paper_eq7_eq8(world_size):
    run_spawn(_worker, world_size)
