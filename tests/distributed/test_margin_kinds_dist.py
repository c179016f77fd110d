"""The margin kinds (head.margin.kind) against float64 references written from their papers, on
1, 2 and 3 gloo ranks, with class sampling on and off and LEAP off and on; their running
statistics across world sizes and through save -> reshard -> resume.

The references below share no code with facetrain.heads (they are the papers' equations):
  ElasticFace-Arc  target s cos(clip(theta_y + alpha_y + m_n, 0, pi)),  m_n ~ N(m, sigma)
  ElasticFace-Cos  target s (cos(clip(theta_y + alpha_y, 0, pi)) - m_n)
  CurricularFace   T_n = cos(clip(theta_y + alpha_y + m, 0, pi)); t <- r mean(cos theta_y) + (1-r) t;
                   other c' -> c' (t + c') where c' > T_n
  AdaFace          zhat = clip(h (||z|| - mu) / (sd + 1e-3), -1, 1) after mu, sd <- EMA of the
                   batch's mean and unbiased std of clip(||z||, 1e-3, 100);
                   target s (cos(clip(theta_y + alpha_y - m zhat, 1e-3, pi - 1e-3)) - m - m zhat),
                   theta_y = arccos(clip(cos_y, -1 + 1e-3, 1 - 1e-3)) (its released code)
  Sub-center      cos theta_j = max_k cos(f, W_jk), then ArcFace's target
  MagFace         a = clip(|f|, a_min, a_max), m(a) linear onto [m_min, m_max],
                   target s cos(clip(theta_y + alpha_y + m(a), 0, pi)), loss + lambda_g mean(1/a + a/a_max^2)
  LDAM            m_j = max_m (K_min / K_j)^(1/4), target s (cos(clip(theta_y + alpha_y, 0, pi)) - m_y);
                   DRW: CE_n weighted by (1 - b) / (1 - b^K_y), mean 1 over classes, from its epoch
  logit adjust    every scaled logit j + tau log(K_j / sum K)
  inter-class     a non-target cosine above the threshold becomes 0 before anything else
  every kind       other logits s cos(clip(theta_j + alpha_j, 0, pi)) (LEAP's Eq. 7/8 angles)
The random values (LEAP's angles, ElasticFace's z_n) are pure functions of the head's draw
counter (facetrain/heads/noise.py), so the reference re-draws them from that counter, as
test_leap_eq78_dist.py does. Loss and gradients of embeddings and weights agree to 1e-5.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _helpers import gather_head_classes_and_weight, run_spawn
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import single_process
from facetrain.heads import noise
from facetrain.heads.kinds.elasticface import SALT
from facetrain.heads.partial_fc import PartialFC

C, D, N = 53, 16, 12                       # 53 classes: blocks 27/26 and 18/18/17; global batch 12
COUNTS = np.random.RandomState(3).randint(1, 40, size=C)
STD = 0.05 + 0.3 * ((np.arange(C) * 0.37) % 1.0)
# case -> (margin, other head fields); the case name is the margin kind unless it says otherwise.
KINDS = {
    "elasticface_arc": (MarginConfig("elasticface_arc", 64.0, 0.35, 0.5, sigma=0.1), {}),
    "elasticface_cos": (MarginConfig("elasticface_cos", 64.0, 0.35, 0.5, sigma=0.1), {}),
    "curricularface": (MarginConfig("curricularface", 64.0, 0.35, 0.5, stat_momentum=0.3), {}),
    "adaface": (MarginConfig("adaface", 64.0, 0.35, 0.4, h=0.333, stat_momentum=0.3), {}),
    "subcenter": (MarginConfig("subcenter", 64.0, 0.35, 0.5, subcenters=3), {}),
    "magface": (MarginConfig("magface", 64.0, 0.35, 0.5, mag_a_min=10.0, mag_a_max=30.0,
                             lambda_g=35.0), {}),   # a_max 30: part of the batch clips at each end
    "ldam_drw": (MarginConfig("ldam", 64.0, ldam_max_m=0.5),     # deferred weights on (epoch 1)
                 {"class_balance_beta": 0.99, "class_balance_start_epoch": 1}),
    "logit_adjust": (MarginConfig("cosface", 64.0, 0.35), {"logit_adjust_tau": 1.0}),
    "interclass_filter": (MarginConfig("arcface", 64.0, 0.0, 0.5), {"interclass_filter": 0.1}),
}
STATEFUL = ("curricularface", "adaface")
START = {"curricularface": {"t": torch.tensor(0.3)},          # visible modulation from step 0
         "adaface": {"norm_mean": torch.tensor(20.0), "norm_std": torch.tensor(5.0)}}  # zhat clips


# ---- float64 references from the papers ----------------------------------------------------
def paper_loss(case, emb, weight, labels, cls, alpha, stats, z_margin):
    """Mean CE and the updated running statistics. emb [N, D] (un-normalised), weight [C', D]
    ([C', K, D] for sub-centres) of the global classes cls [C'], labels [N] in [0, C'),
    alpha [N, C'] LEAP angles, stats dict of floats, z_margin [N]."""
    m, hk = KINDS[case]
    kind = m.kind
    counts = torch.as_tensor(COUNTS, dtype=torch.float64)
    f = emb / emb.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=-1, keepdim=True)
    cos = torch.einsum("nd,ckd->nck", f, w).max(dim=2).values if w.dim() == 3 else f @ w.T
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    if hk.get("interclass_filter"):
        cos = torch.where(~onehot & (cos.detach() > hk["interclass_filter"]), 0.0 * cos, cos)
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    other = torch.cos(torch.clamp(theta + alpha, 0.0, math.pi))
    th_y, a_y = theta[onehot], alpha[onehot]
    stats = dict(stats)
    reg = 0.0
    if kind == "magface":
        a = emb.norm(dim=1).clamp(m.mag_a_min, m.mag_a_max)
        marg = m.mag_m_min + (m.mag_m_max - m.mag_m_min) * (a - m.mag_a_min) / (m.mag_a_max - m.mag_a_min)
        target = torch.cos(torch.clamp(th_y + a_y + marg, 0, math.pi))
        reg = m.lambda_g * (1.0 / a + a / m.mag_a_max ** 2).mean()
    elif kind in ("subcenter", "arcface"):
        target = torch.cos(torch.clamp(th_y + a_y + m.m_arc, 0, math.pi))
    elif kind == "cosface":
        target = torch.cos(torch.clamp(th_y + a_y, 0, math.pi)) - m.m_cos
    elif kind == "ldam":
        m_class = m.ldam_max_m * (counts.min() / counts) ** 0.25
        target = torch.cos(torch.clamp(th_y + a_y, 0, math.pi)) - m_class[cls[labels]]
    elif kind == "elasticface_arc":
        target = torch.cos(torch.clamp(th_y + a_y + (m.m_arc + m.sigma * z_margin), 0, math.pi))
    elif kind == "elasticface_cos":
        target = torch.cos(torch.clamp(th_y + a_y, 0, math.pi)) - (m.m_cos + m.sigma * z_margin)
    elif kind == "curricularface":
        target = torch.cos(torch.clamp(th_y + a_y + m.m_arc, 0, math.pi))
        r = m.stat_momentum
        stats["t"] = r * float(cos[onehot].detach().mean()) + (1 - r) * stats["t"]
        hard = other.detach() > target.detach().unsqueeze(1)
        other = torch.where(hard, other * (stats["t"] + other), other)
    elif kind == "adaface":
        norms = emb.detach().norm(dim=1).clamp(1e-3, 100.0)
        r = m.stat_momentum
        stats["norm_mean"] = r * float(norms.mean()) + (1 - r) * stats["norm_mean"]
        stats["norm_std"] = r * float(norms.std(unbiased=True)) + (1 - r) * stats["norm_std"]
        zhat = (m.h * (norms - stats["norm_mean"]) / (stats["norm_std"] + 1e-3)).clamp(-1, 1)
        th_y = torch.acos(cos[onehot].clamp(-1 + 1e-3, 1 - 1e-3))
        target = torch.cos(torch.clamp(th_y + a_y - m.m_arc * zhat, 1e-3, math.pi - 1e-3)) \
            - (m.m_arc + m.m_arc * zhat)
    logits = m.scale * torch.where(onehot, target.unsqueeze(1).expand_as(other), other)
    if hk.get("logit_adjust_tau"):
        logits = logits + hk["logit_adjust_tau"] * torch.log(counts[cls] / counts.sum())
    ce = torch.logsumexp(logits, dim=1) - logits[onehot]
    if hk.get("class_balance_beta"):
        b = hk["class_balance_beta"]
        wc = (1 - b) / (1 - b ** counts)
        ce = ce * (wc / wc.mean())[cls[labels]]
    return ce.mean() + reg, stats


def _batch(step: int, weight_full=None):
    """The global batch of a step: the same for every world size (rank r holds its slice)."""
    n = N
    g = torch.Generator().manual_seed(700 + step)
    labels = torch.randint(0, C, (n,), generator=g)
    emb = torch.randn(n, D, generator=g)
    emb = F.normalize(emb, dim=1) * (5.0 + 30.0 * torch.rand(n, 1, generator=g))  # norms 5..35
    if weight_full is not None:             # a third close to their class (small angles)
        if weight_full.dim() == 3:          # sub-centres: near one of them
            weight_full = weight_full[:, 1]
        near = torch.arange(n) % 3 == 0
        emb[near] = (F.normalize(weight_full[labels[near]], dim=1).float() * 20.0
                     + 0.5 * torch.randn(int(near.sum()), D, generator=g))
    return emb, labels


def _slice(ctx) -> slice:
    per = N // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def _gather(ctx, t):
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, t.detach().numpy())
    return torch.as_tensor(np.concatenate(parts))


def _make_head(ctx, kind, rate, leap):
    lc = LeapConfig(mode="full", update_interval=10**6) if leap else LeapConfig(mode="off")
    rows = "sampled" if rate < 1 else "all"    # sparse row gradients when sampling
    margin, extra = KINDS[kind]
    head = PartialFC(D, COUNTS, HeadConfig(rate, margin, rows, **extra), lc, ctx, seed=11).train()
    head.set_epoch(1)
    with torch.no_grad():
        head.weight.copy_(F.normalize(head.weight, dim=-1))
        if leap:
            head.leap.class_std[:-1] = torch.as_tensor(STD[head.start:head.end], dtype=torch.float32)
            head.leap_steps = 1                 # no centre update or refresh
    if kind in START:
        head.margin.load_state_dict({k: v.clone() for k, v in START[kind].items()}, "test")
    return head


def _head_stats(head):
    return {k: float(v) for k, v in head.margin.state_dict().items()}


def _step(ctx, head, kind, step, stats, leap, rate):
    """One forward/backward of the sharded head against the reference; returns the new stats."""
    sl = _slice(ctx)
    weight_full = _gather(ctx, head.weight).double()
    emb, labels = _batch(step, weight_full)
    counter = int(head.noise_counter)
    head.weight.grad = None
    local = emb[sl].clone().requires_grad_()
    loss = head(local, labels[sl])
    loss.backward()
    cls, full_w = gather_head_classes_and_weight(head, sampled=rate < 1.0)
    if rate < 1.0:
        assert len(cls) < C and torch.isin(labels, cls).all()
    n = len(labels)
    alpha = torch.zeros(n, len(cls), dtype=torch.float64)
    if leap:
        rk, ck = noise.noise_keys(head._noise_seed, torch.tensor(counter), n, cls)
        alpha = torch.as_tensor(STD, dtype=torch.float64)[labels].unsqueeze(1) * noise.gauss(rk, ck).double()
    z = noise.sample_gauss(head._noise_seed, torch.tensor(counter), n, SALT).double()
    w = full_w[cls].clone().requires_grad_()
    e = emb.double().requires_grad_()
    ref, stats = paper_loss(kind, e, w, torch.searchsorted(cls, labels), cls, alpha, stats, z)
    ref.backward()
    tag = f"{kind} leap={leap} rate={rate} step={step} ws={ctx.world_size}"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, msg=tag)
    gw = torch.zeros(C, *full_w.shape[1:], dtype=torch.float64)
    gw[cls] = w.grad
    grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    for name, mine, full, scale in (("embeddings", local.grad, e.grad[sl], e.grad.abs().max()),
                                    ("weights", grad_w, gw[head.start:head.end], gw.abs().max())):
        err = (mine.double() - full).abs().max() / scale.clamp(min=1e-12)
        assert err < 1e-5, f"{tag}: {name} gradient differs by {float(err):.3g} of its scale"
    mine = _head_stats(head)
    for k, v in stats.items():
        assert abs(mine[k] - v) <= 1e-6 * max(1.0, abs(v)), f"{tag}: {k} {mine[k]} vs {v}"
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    assert all(o == mine for o in everyone), f"{tag}: running statistics differ between ranks"
    return stats


def _check_kinds(ctx, out_dir) -> None:
    final = {}
    for kind in KINDS:
        for leap in (False, True):
            for rate in (1.0, 0.4):
                head = _make_head(ctx, kind, rate, leap)
                stats = {k: float(v) for k, v in START.get(kind, {}).items()}
                for step in range(2 if kind in STATEFUL else 1):
                    stats = _step(ctx, head, kind, step, stats, leap, rate)
                final[f"{kind}/{leap}/{rate}"] = _head_stats(head)
    if ctx.rank == 0:
        with open(os.path.join(out_dir, f"stats_ws{ctx.world_size}.json"), "w") as fh:
            json.dump(final, fh)


def _check_resume(ctx) -> None:
    """Steps 0-1 on one process, saved; a fresh head on this world size loads it (1 -> W
    reshard) and runs step 2: the same loss and statistics as a head that never stopped."""
    sl = _slice(ctx)
    for kind in STATEFUL + ("elasticface_arc", "subcenter"):
        solo = _make_head(single_process(), kind, 1.0, False)
        for step in range(2):
            emb, labels = _batch(100 + step)
            solo(emb.clone().requires_grad_(), labels)
        saved = solo.state_dict()
        del solo                             # "killed"
        resumed = PartialFC(D, COUNTS, HeadConfig(1.0, KINDS[kind][0]), LeapConfig(mode="off"),
                            ctx, seed=99).train()
        resumed.load_state_dict([saved], ctx.world_size)
        straight = _make_head(ctx, kind, 1.0, False)
        for step in range(2):
            emb, labels = _batch(100 + step)
            straight(emb[sl].clone().requires_grad_(), labels[sl])
        emb, labels = _batch(102)
        tag = f"{kind} resume 1 -> {ctx.world_size}"
        assert int(resumed.noise_counter) == int(straight.noise_counter), tag
        a = resumed(emb[sl].clone().requires_grad_(), labels[sl])
        b = straight(emb[sl].clone().requires_grad_(), labels[sl])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=tag)
        for k, v in _head_stats(straight).items():
            assert abs(_head_stats(resumed)[k] - v) <= 1e-6 * max(1.0, abs(v)), f"{tag}: {k}"


def _worker(ctx, out_dir) -> None:
    _check_kinds(ctx, out_dir)
    _check_resume(ctx)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kinds"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_margin_kinds_match_papers(world_size, stats_dir):
    run_spawn(_worker, world_size, stats_dir)
    # Running statistics: the same for every world size that has run in this session.
    mine = json.load(open(os.path.join(stats_dir, f"stats_ws{world_size}.json")))
    for other in (1, 2, 3):
        path = os.path.join(stats_dir, f"stats_ws{other}.json")
        if other != world_size and os.path.exists(path):
            theirs = json.load(open(path))
            for key, vals in mine.items():
                for k, v in vals.items():
                    assert abs(theirs[key][k] - v) <= 1e-6 * max(1.0, abs(v)), (key, k, other)
