"""PartialFC on 1, 2 and 3 gloo processes (uneven class blocks) against single-process references.

One spawn per world size runs every check: margins x sampling (loss, embedding and weight grads
vs a float64 full softmax), LEAP (its angles are keyed on sample and global class, so the
perturbed loss and gradients must match a single-process head too), LEAP statistics vs a
single-process head, and save -> reshard 2 -> 3 -> load.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _helpers import gather_head_classes_and_weight, reference_loss, run_spawn
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import single_process
from facetrain.heads.partial_fc import PartialFC

C, D, B = 101, 16, 4                      # 101 classes: blocks 51/50 and 34/34/33
COUNTS = np.random.RandomState(0).randint(1, 60, size=C)
MARGINS = [MarginConfig("cosface", 16.0, 0.2, 0.0), MarginConfig("arcface", 16.0, 0.0, 0.3),
           MarginConfig("combined", 16.0, 0.1, 0.2)]


def _batch(step: int, n: int, classes=None):
    g = torch.Generator().manual_seed(1000 + step)
    emb = torch.randn(n, D, generator=g)
    pool = torch.arange(C) if classes is None else classes
    labels = pool[torch.randint(0, len(pool), (n,), generator=g)]
    return emb, labels


def _check_margins_and_sampling(ctx) -> None:
    n = B * ctx.world_size
    sl = slice(ctx.rank * B, (ctx.rank + 1) * B)
    for i, margin in enumerate(MARGINS):
        for rate in (1.0, 0.3):
            head = PartialFC(D, COUNTS, HeadConfig(rate, margin), LeapConfig(mode="off"), ctx, seed=3)
            emb, labels = _batch(i, n)
            local = emb[sl].clone().requires_grad_()
            loss = head(local, labels[sl])
            loss.backward()
            cls, full_w = gather_head_classes_and_weight(head, sampled=rate < 1.0)
            if rate < 1.0:
                assert len(cls) < C and torch.isin(labels, cls).all()
            w = full_w[cls].requires_grad_()
            e = emb.double().requires_grad_()
            remap = torch.searchsorted(cls, labels)
            ref = reference_loss(e, w, remap, margin)
            ref.backward()
            tag = f"{margin.kind} rate={rate} ws={ctx.world_size}"
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, msg=tag)
            torch.testing.assert_close(local.grad.double(), e.grad[sl], rtol=1e-4, atol=1e-6, msg=tag)
            gw = torch.zeros(C, D, dtype=torch.float64)
            gw[cls] = w.grad
            scale = gw.abs().max()
            torch.testing.assert_close(head.weight.grad.double() / scale, gw[head.start:head.end] / scale,
                                       rtol=1e-4, atol=1e-6, msg=tag)


def _leap_pair(ctx, cfg):
    dist_head = PartialFC(D, COUNTS, HeadConfig(1.0, MARGINS[0]), cfg, ctx, seed=5)
    ref_head = PartialFC(D, COUNTS, HeadConfig(1.0, MARGINS[0]), cfg, single_process(), seed=5)
    return dist_head.train(), ref_head.train()


def _check_leap(ctx) -> None:
    classes = torch.arange(0, C, 6)        # repeated labels so stats become valid quickly
    n = B * ctx.world_size
    sl = slice(ctx.rank * B, (ctx.rank + 1) * B)
    for mode, gran in (("full", "logit"), ("full", "sample"), ("vanilla", "logit")):
        cfg = LeapConfig(mode=mode, update_interval=1, alpha_granularity=gran, head_threshold=30)
        head, ref = _leap_pair(ctx, cfg)
        perturbed_seen = 0
        for step in range(8):
            emb, labels = _batch(50 + step, n, classes)
            local = emb[sl].clone().requires_grad_()
            loss = head(local, labels[sl])
            loss.backward()
            e = emb.clone().requires_grad_()
            ref_loss = ref(e, labels)
            ref_loss.backward()
            tag = f"leap {mode}/{gran} step {step} ws={ctx.world_size}"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4, msg=tag)
            torch.testing.assert_close(local.grad, e.grad[sl], rtol=1e-3, atol=1e-5, msg=tag)
            for mine, full in zip(head.class_stats(), ref.class_stats()):
                torch.testing.assert_close(mine, full[head.start:head.end], rtol=1e-4, atol=1e-6, msg=tag)
            summ, rsumm = head.leap_summary(), ref.leap_summary()
            assert summ["num_perturbed"] == rsumm["num_perturbed"], tag
            assert abs(summ["pooled_var"] - rsumm["pooled_var"]) < 1e-5, tag
            perturbed_seen += summ["num_perturbed"]
        assert perturbed_seen > 0, "the LEAP checks never perturbed anything"


def _leap_run(ctx, steps):
    cfg = LeapConfig(mode="full", update_interval=2, memory_factor=0.5)
    head = PartialFC(D, COUNTS, HeadConfig(1.0, MARGINS[1]), cfg, ctx, seed=9).train()
    n = B * ctx.world_size
    sl = slice(ctx.rank * B, (ctx.rank + 1) * B)
    for step in steps:
        emb, labels = _batch(200 + step, n, torch.arange(0, C, 4))
        head(emb[sl].clone().requires_grad_(), labels[sl]).backward()
    return head


def _save_states(ctx, out_dir) -> None:
    """World size 2: train, save every shard, train one more update, record the stats."""
    head = _leap_run(ctx, range(10))
    torch.save(head.state_dict(), os.path.join(out_dir, f"shard{ctx.rank}.pt"))
    _leap_run_continue(ctx, head, out_dir, "after2")


def _leap_run_continue(ctx, head, out_dir, name):
    n = 48                                  # the same global batch for 2 and 3 ranks
    per = n // ctx.world_size
    emb, labels = _batch(999, n, torch.arange(0, C, 4))
    head(emb[ctx.rank * per:(ctx.rank + 1) * per].clone(), labels[ctx.rank * per:(ctx.rank + 1) * per])
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, [t.numpy() for t in head.class_stats()])
    if ctx.rank == 0:
        joined = [np.concatenate([p[i] for p in parts]) for i in range(3)]
        np.savez(os.path.join(out_dir, f"{name}.npz"), *joined)


def _load_states(ctx, out_dir) -> None:
    """World size 3: reshard the 2 saved shards, load, compare state and the next update."""
    states = [torch.load(os.path.join(out_dir, f"shard{r}.pt"), weights_only=True)
              for r in range(2)]
    new = PartialFC.reshard(states, 3)
    cfg = LeapConfig(mode="full", update_interval=2, memory_factor=0.5)
    head = PartialFC(D, COUNTS, HeadConfig(1.0, MARGINS[1]), cfg, ctx, seed=123).train()
    head.load_state_dict(states, 3)          # 2 saved shards -> 3, resharded inside
    mine = head.state_dict()
    torch.testing.assert_close(mine["weight"], new[ctx.rank]["weight"])
    back = PartialFC.reshard(new, 2)
    for r in range(2):                     # 2 -> 3 -> 2 is the identity
        torch.testing.assert_close(back[r]["weight"], states[r]["weight"])
        for k, v in states[r]["leap"].items():
            torch.testing.assert_close(back[r]["leap"][k], v, msg=k)
    torch.testing.assert_close(mine["weight"], new[ctx.rank]["weight"])
    for k, v in new[ctx.rank]["leap"].items():
        torch.testing.assert_close(mine["leap"][k], v, msg=k)
    assert head.calls == states[0]["calls"]
    _leap_run_continue(ctx, head, out_dir, "after3")


def _worker(ctx, out_dir) -> None:
    _check_margins_and_sampling(ctx)
    _check_leap(ctx)
    if ctx.world_size == 2:
        _save_states(ctx, out_dir)
    if ctx.world_size == 3:
        _load_states(ctx, out_dir)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shards"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_partial_fc_matches_single_process(world_size, shard_dir):
    if world_size == 3 and not os.path.exists(os.path.join(shard_dir, "shard1.pt")):
        run_spawn(_save_only, 2, shard_dir)
    run_spawn(_worker, world_size, shard_dir)
    if world_size == 3:
        a, b = np.load(os.path.join(shard_dir, "after2.npz")), np.load(os.path.join(shard_dir, "after3.npz"))
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def _save_only(ctx, out_dir) -> None:
    _save_states(ctx, out_dir)
