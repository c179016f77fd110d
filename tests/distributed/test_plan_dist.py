"""The capacity planner against a 2-rank gloo job: per-rank classifier + LEAP state bytes, and
the bytes of every collective one training step of the classifier issues."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from _helpers import run_spawn
from facetrain import plan
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.heads.partial_fc import PartialFC

C, D, B, K = 3001, 32, 8, 6        # classes (uneven split), embedding, batch per rank, K_i


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _scenario(ctx, sample_rate: float) -> None:
    w = ctx.world_size
    head = PartialFC(D, np.full(C, K), HeadConfig(sample_rate=sample_rate,
                                                  margin=MarginConfig(kind="cosface")),
                     LeapConfig(mode="full", update_interval=1, start_epoch=0), ctx, seed=0)
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sent = []                                  # bytes this rank sends, ring algorithms
    real_reduce = dist.all_reduce
    real_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce(t, *a, **k):
        sent.append(("reduce", 2 * (w - 1) / w * t.numel() * t.element_size()))
        return real_reduce(t, *a, **k)

    def all_gather(out, t, *a, **k):
        sent.append(("gather", (w - 1) / w * out.numel() * out.element_size()))
        return real_gather(out, t, *a, **k)

    dist.all_reduce = all_reduce
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    setattr(dist, name, all_gather)
    try:
        gen = torch.Generator().manual_seed(ctx.rank)
        emb = torch.randn(B, D, generator=gen, requires_grad=True)
        head(emb, torch.randint(0, C, (B,), generator=gen)).backward()
    finally:
        dist.all_reduce = real_reduce
        setattr(dist, name, real_gather)
    opt.step()
    p = plan.PlanInput(classes=C, world_size=w, sample_rate=sample_rate, batch_size=B,
                       embedding_size=D, images_per_class=K, leap="full", update_interval=1,
                       precision="fp32", backbone="iresnet18")
    com = plan.communication(p)
    head_com = com["total"] - com["DDP gradient all-reduce"]
    assert abs(sum(b for _, b in sent) - head_com) < 1e-6, (sent, com)
    # the embedding all-gather and its gradient all-reduce, separately
    assert sent[0] == ("gather", com["embedding all-gather (forward)"])
    assert sent[-1] == ("reduce", com["embedding gradient all-reduce (backward)"])
    # persistent state of this rank (rank 0 holds the larger shard the plan describes)
    state = _storage_bytes([head.weight, head.weight.grad, *head.leap.buffers(),
                            *[v for s in opt.state.values() for v in s.values()
                              if torch.is_tensor(v)]])
    want = sum(plan.classifier_memory(p).values()) + sum(plan.leap_memory(p).values())
    if ctx.rank == 0:
        # On CPU the shard's K_i table is a view of the global one (one C x int64 storage).
        assert state == want - plan.local_classes(C, w) * 8, (state, want)


def _both(ctx) -> None:
    for rate in (0.1, 1.0):
        _scenario(ctx, rate)


def test_plan_matches_two_gloo_ranks():
    run_spawn(_both, 2)
