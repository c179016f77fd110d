"""Process-group setup, device choice and collectives that carry gradients.

One `DistContext` object holds every distributed fact a component needs; it is built once by
the launcher and passed down. Nothing here runs at import.
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    `group` is the process group the classifier's class blocks are split over and the backbone is
    data-parallel over (None means a single process with no process group at all).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]
    group: Optional[dist.ProcessGroup]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None


def single_process(device: Optional[torch.device] = None) -> DistContext:
    """A context for one process without any process group (tests, evaluation, tools)."""
    return DistContext(0, 1, 0, device or torch.device("cpu"), None, None)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from exc


def _uses_cuda(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def backend_for(device: str) -> str:
    """The process-group backend for `train.device` (auto, cpu or cuda): NCCL on CUDA, gloo
    on CPU."""
    return "nccl" if _uses_cuda(device) else "gloo"


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Set up the default process group from torchrun's environment.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". The backend follows the
    device: NCCL on CUDA, gloo on CPU. Without torchrun variables (WORLD_SIZE unset) this
    returns a single-process context and creates no group. After a `torchrun --max-restarts`
    restart the group is built on a store prefix of that attempt's own (_restart_store): the one
    place where the default group is created.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = _uses_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch.cuda.is_available() is False; "
                           "use device=cpu or install a CUDA build of torch")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:
        return DistContext(0, 1, 0, dev, None, None)
    backend = backend_for(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(timeout)
        if store is not None:
            dist.init_process_group(backend, store=store, timeout=timeout, rank=rank,
                                    world_size=world_size)
        else:
            kwargs = {"backend": backend, "timeout": timeout}
            if use_cuda:
                kwargs["device_id"] = dev
            dist.init_process_group(**kwargs)
    return DistContext(rank, world_size, local_rank, dev, backend, dist.group.WORLD)


def _restart_store(timeout: datetime.timedelta) -> Optional[dist.Store]:
    """After a `torchrun --max-restarts` restart, a store prefix of the attempt's own (None on
    the first attempt). The restarted workers reuse the agent's store, where the failed
    attempt's gloo addresses are still published under the same keys; a rank that reads one of
    those stale entries fails with "connectFullMesh ... Connection refused"."""
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if attempt == 0:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"facetrain_restart_{attempt}", store)


# Modules that write `group=<the world group>` as a default argument. Python evaluates defaults
# once, at import; a module imported while a world group is alive keeps that group in its
# functions' defaults for the life of the process, past `destroy_process_group()`.
# torch.distributed.nn.functional is imported by torch._dynamo, which the first torch optimizer
# imports; deepspeed.comm.torch by `deepspeed.initialize`. Both happen after the group exists.
GROUP_DEFAULT_MODULES = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
    "deepspeed.comm.torch",
)


def release_group_defaults(group: Optional[dist.ProcessGroup],
                           modules: Sequence[str] = GROUP_DEFAULT_MODULES) -> int:
    """Replace `group` by None in the default arguments of the functions (and class methods)
    of `modules` that are imported; returns how many defaults were replaced.

    A group held that way is freed only at interpreter teardown, where its gloo threads can
    abort the process ("terminate called without an active exception", SIGABRT after a run
    that succeeded). Every function concerned reads None as "the default group", so behaviour
    is unchanged while the group lives; after `destroy_process_group()` nothing holds it and
    its threads are joined then. Call before destroying the group (`finish` and
    `Trainer.fit` do)."""
    if group is None:
        return 0
    replaced = 0
    for name in modules:
        module = sys.modules.get(name)
        if module is None:
            continue
        for obj in list(vars(module).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) else [obj]
            for member in members:
                replaced += _release_defaults(member, group)
    return replaced


def _release_defaults(obj: Any, group: dist.ProcessGroup) -> int:
    """Replace `group` in the defaults of a function, of what it wraps, and of a
    staticmethod/classmethod's function."""
    replaced = 0
    seen = set()
    obj = getattr(obj, "__func__", obj)
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        defaults = getattr(obj, "__defaults__", None)
        if isinstance(defaults, tuple) and any(d is group for d in defaults):
            obj.__defaults__ = tuple(None if d is group else d for d in defaults)
            replaced += sum(d is group for d in defaults)
        kwdefaults = getattr(obj, "__kwdefaults__", None)
        if isinstance(kwdefaults, dict):
            for key, value in list(kwdefaults.items()):
                if value is group:
                    kwdefaults[key] = None
                    replaced += 1
        obj = getattr(obj, "__wrapped__", None)
    return replaced


def finish(ctx: DistContext) -> None:
    """End a run that succeeded on every rank: wait for all ranks, then tear the group down.

    The barrier keeps rank 1 from leaving while rank 0 still exports: a rank that ended early
    and then aborted at exit ("terminate called without an active exception", SIGABRT after
    "done") made torchrun kill rank 0 mid-export. Before the teardown, other libraries'
    default arguments let go of the group (`release_group_defaults`) and reference cycles are
    collected, so that nothing holding the group is left to be freed during interpreter
    finalization, where its gloo threads are torn down in no fixed order and can abort the
    process. launch/train_face.py also skips finalization after success."""
    if not (ctx.distributed and dist.is_initialized()):
        return
    dist.barrier(group=ctx.group)
    release_group_defaults(ctx.group)
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


class SetupFailedError(RuntimeError):
    """Raised on every rank when any rank failed its checks before training.

    `cause` is the error of the lowest failing rank's own check on that rank (None elsewhere);
    `report` is True on exactly one rank, the one that should print it."""

    def __init__(self, cause: Optional[BaseException], report: bool, failed_rank: int) -> None:
        super().__init__(str(cause) if cause is not None else f"rank {failed_rank} failed its "
                         "checks before training")
        self.cause, self.report, self.failed_rank = cause, report, failed_rank


def raise_if_any_failed(ctx: DistContext, err: Optional[BaseException]) -> None:
    """Collective: every rank calls it with its own setup error (or None) before the first
    collective of the run. If any rank failed, every rank raises SetupFailedError and only the
    lowest failing rank reports, so a job prints one message instead of one traceback per rank,
    and no rank is left waiting in a collective its peers never reach."""
    if not ctx.distributed:
        if err is not None:
            raise SetupFailedError(err, True, ctx.rank) from err
        return
    first = torch.tensor([ctx.world_size if err is None else ctx.rank], dtype=torch.int64,
                         device=ctx.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=ctx.group)
    failed = int(first)
    if failed == ctx.world_size:
        return
    mine = err if failed == ctx.rank else None
    raise SetupFailedError(mine, mine is not None, failed) from mine


def reported(ctx: DistContext) -> None:
    """After a SetupFailedError was printed: wait for every rank, so that no rank exits (and
    makes torchrun stop the job) before the reporting rank's message is out."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier(group=ctx.group)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank its own slice of the summed
    gradient.

    Every rank computes a loss over the whole gathered batch, so the gradient w.r.t. rank r's
    slice is the sum over ranks of their partial gradients: backward all-reduces (sum) and then
    slices. Requires equal dim-0 sizes on every rank (the loaders guarantee it).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ws = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.n = tensor.shape[0]
        out = torch.empty((ws * tensor.shape[0],) + tuple(tensor.shape[1:]),
                          dtype=tensor.dtype, device=tensor.device)
        # One collective for the whole batch; all ranks pass the same shape.
        _all_gather_flat(out, tensor, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        # Sum the partial gradients every rank computed for every slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _all_gather_flat(out: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """Gather equal-sized dim-0 blocks into `out` with one collective.

    torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns);
    older releases (the GPU images) only have the old one."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, tensor.contiguous(), group=group)


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate `tensor` [B, ...] from every rank of `group` into [world*B, ...] (rank order).

    With group None (single process) this is the identity.
    """
    if group is None:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_no_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 for tensors that carry no gradient (labels, indices)."""
    if group is None:
        return tensor
    ws = dist.get_world_size(group)
    out = torch.empty((ws * tensor.shape[0],) + tuple(tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out, tensor, group)
    return out
