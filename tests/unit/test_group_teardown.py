"""Nothing outlives the process group: default arguments that torch and DeepSpeed bind to the
world group at import are let go before the group is destroyed (`release_group_defaults`).

A group still held at interpreter teardown keeps its gloo threads, which abort the process now
and then ("terminate called without an active exception"). The subprocess test shows the
mechanism on torch itself: the first optimizer built after the group exists imports
torch._dynamo, which imports torch.distributed.nn.functional, whose `group=group.WORLD`
defaults then hold the live group."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import types

from facetrain.dist import release_group_defaults


def _fake_module(group: object) -> types.ModuleType:
    """A module shaped like the ones that bind the group: plain function, keyword-only default,
    a method, a static method, and a decorated function (functools.wraps)."""
    mod = types.ModuleType("fake_collectives")

    def broadcast(tensor, src=0, group=group):
        return group

    def gather(tensor, *, group=group, dst=0):
        return group

    class Backend:
        def barrier(self, group=group, async_op=False):
            return group

        @staticmethod
        def reduce(tensor, group=group):
            return group

    def inner(tensor, group=group):
        return group

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        return inner(*args, **kwargs)

    mod.broadcast, mod.gather, mod.Backend, mod.wrapper = broadcast, gather, Backend, wrapper
    mod.unrelated = lambda x=1, y="group": (x, y)
    return mod


def test_every_default_bound_to_the_group_becomes_none(monkeypatch):
    group, other = object(), object()
    mod = _fake_module(group)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    assert release_group_defaults(other, [mod.__name__]) == 0
    assert release_group_defaults(group, [mod.__name__, "not_imported_module"]) == 5
    assert mod.broadcast(None) is None and mod.gather(None) is None
    assert mod.Backend().barrier() is None and mod.Backend.reduce(None) is None
    assert mod.wrapper(None) is None
    assert mod.unrelated() == (1, "group")
    assert release_group_defaults(group, [mod.__name__]) == 0       # nothing left to release
    assert release_group_defaults(None, [mod.__name__]) == 0


_SCRIPT = textwrap.dedent("""
    import gc, os, sys
    import torch, torch.distributed as dist
    from facetrain.dist import release_group_defaults
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    before = sys.getrefcount(dist.group.WORLD)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)   # imports torch._dynamo
    held = sys.getrefcount(dist.group.WORLD) - before
    released = release_group_defaults(dist.group.WORLD) if sys.argv[1] == "release" else 0
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print(held, released, sum("gloo" in n for n in names))
    sys.stdout.flush()
    os._exit(0)      # the unreleased case must not risk the very abort it shows
""")


def _run(mode: str) -> list:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()[-3:]]


def test_torch_binds_the_live_group_at_import_and_release_frees_it():
    held, released, threads = _run("keep")
    assert held > 0 and released == 0    # torch 2.13: torch.distributed.nn.functional's ten
    assert threads > 0                    # the destroyed group's gloo threads still run
    held, released, threads = _run("release")
    assert held > 0 and released == held
    assert threads == 0
