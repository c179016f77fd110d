"""Shared helpers for multi-process tests: a gloo spawn runner and single-process references.

`run_spawn(fn, world_size, *args)` starts world_size CPU processes with a gloo group on a free
port and calls fn(ctx, *args) in each (fn must be a module-level function). Run several checks
per spawn: starting processes costs seconds.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facetrain.config import MarginConfig
from facetrain.dist import DistContext, finish, release_group_defaults


TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    """A port that was free a moment ago, for tests that must hand a port number to torchrun.
    It can be taken before use; in-process spawns use `run_spawn`, whose store holds its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_threads() -> list:
    """Names of this process's gloo threads (network loop and work queues): present exactly
    while some gloo process group is alive."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:          # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    """One rank: the group is ended as the product ends a run (`facetrain.dist.finish`), and
    then no gloo thread may be left. A group that something still holds would be freed only at
    interpreter teardown, where its threads abort the process now and then ("terminate called
    without an active exception"); checking the threads makes that leak fail every time."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    ctx = DistContext(rank, world_size, rank, torch.device("cpu"), "gloo", dist.group.WORLD)
    try:
        fn(ctx, *args)
    except BaseException:
        release_group_defaults(ctx.group)
        dist.destroy_process_group()
        raise
    finish(ctx)
    del ctx
    gc.collect()
    left = gloo_threads()
    assert not left, (f"rank {rank}: gloo threads {left} still run after the process group was "
                      "destroyed: something holds the group")


def run_spawn(fn: Callable, world_size: int, *args) -> None:
    """Run fn(ctx, *args) on world_size gloo processes; any exception fails the caller.

    The rendezvous store is served from this process on a port the OS picks at bind time, so no
    other process can take the port between choosing and binding it (a port picked free and
    bound later was a source of rare "address already in use" failures under load)."""
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=TIMEOUT,
                          wait_for_workers=False)
    try:
        mp.spawn(_entry, args=(world_size, store.port, fn, args), nprocs=world_size, join=True)
    finally:
        del store


def gather_head_classes_and_weight(head, sampled: bool):
    """(global class ids the sharded head used in its last forward, sorted; the full [C, D]
    classifier weight in float64), gathered from every rank. All classes when not sampling."""
    ws = head.ctx.world_size
    cls = torch.arange(head.num_classes)
    if sampled:
        parts = [None] * ws
        dist.all_gather_object(parts, (head.last_sample_index + head.start).tolist())
        cls = torch.tensor(sorted(sum(parts, [])))
    rows = [None] * ws
    dist.all_gather_object(rows, head.weight.detach().numpy())
    return cls, torch.cat([torch.as_tensor(r) for r in rows]).double()


def reference_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   margin: MarginConfig, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Single-process full-softmax loss written straight from the formulas (float64 advised).

    emb [N, D], weight [C, D], labels [N]; alpha [N, 1] or [N, C] LEAP angles (0 = none).
    """
    m_cos = margin.m_cos if margin.kind in ("cosface", "combined") else 0.0
    m_arc = margin.m_arc if margin.kind in ("arcface", "combined") else 0.0
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
    a = torch.zeros_like(cos) if alpha is None else alpha.expand_as(cos)
    other = torch.where(a != 0, torch.cos(torch.clamp(theta + a, 0, math.pi)), cos)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    tgt = torch.cos(torch.clamp(theta + a + m_arc, 0, math.pi)) - m_cos
    if m_arc == 0:
        tgt = torch.where(a != 0, tgt, cos - m_cos)
    logits = margin.scale * torch.where(onehot, tgt, other)
    return F.cross_entropy(logits, labels)
