"""DeepSpeed engine: the backbone under ZeRO stage 1/2 (optimizer state, and with stage 2 the
gradients, partitioned over the ranks), bf16/fp16 from DeepSpeed's own mixed precision.

The classifier stays model-parallel outside DeepSpeed with its own optimizer over this rank's
class rows (already split by class block, so ZeRO has nothing to add there). Gradient accumulation
is DeepSpeed's: `engine.backward` divides the loss by the accumulation factor, which scales the
classifier's gradients the same way, and `engine.step()` is called after every micro-batch so
DeepSpeed's boundary counter matches the trainer's.

Checkpoints: each rank saves its ZeRO partition (`optimizer.state_dict()` with
`elastic_checkpoint` on) in its own file; a resume hands every rank's partition to
`load_state_dict`, which re-partitions for a different number of ranks. DeepSpeed's partition
state holds Python objects (its loss scaler, an enum, dataclasses) that would need unpickling;
`plain_zero_state` stores them as plain values so checkpoints load with weights_only=True.
"""
from __future__ import annotations

import enum
import gc
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from facetrain.config import Config, ConfigError
from facetrain.dist import DistContext
from facetrain.engines.base import (PRECISION_DTYPES, Classifier, Entries,
                                    undo_gradient_averaging)
from facetrain.optim import build_head_optimizer, build_optimizer

def supported_precisions(device: torch.device) -> List[str]:
    """The `train.precision` values DeepSpeed accepts on `device`.

    DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (many Intel CPUs
    have them, AMD EPYC often not) and raises "Type fp16 is not supported on your device" deep
    inside `initialize` otherwise; bf16 and fp32 it always takes. Asking the same probe up front
    turns that into a config error that names the alternatives."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    try:
        fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        fp16 = False
    return ["fp32", "bf16", "fp16"] if fp16 else ["fp32", "bf16"]


def _skip_cpu_shm_comm_build(deepspeed: Any) -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (~35 s) at first init
    when the op probes as compatible. It only serves inference all-reduce; training collectives
    go through torch.distributed (gloo). DeepSpeed has no switch for it, but its probe result is
    a module-level dict meant to be edited ("edits to it persist"), so mark the op unavailable."""
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def ds_config(cfg: Config) -> Dict[str, Any]:
    """The DeepSpeed JSON config for the backbone (per-rank batch, ZeRO stage, precision, clip)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage, "elastic_checkpoint": True},
        # ZeRO refuses a client torch optimizer it has not tested unless told otherwise.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 16},
        # DeepSpeed casts parameters only; BatchNorm needs its running statistics in the same
        # dtype as its weight, so buffers follow the parameters (as module.half() used to).
        **({"data_types": {"buffer_dtype": cfg.train.precision}}
           if cfg.train.precision in ("bf16", "fp16") else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def check_precision(cfg: Config, ctx: DistContext) -> None:
    """ConfigError when DeepSpeed cannot run `train.precision` on this machine."""
    supported = supported_precisions(ctx.device)
    if cfg.train.precision not in supported:
        raise ConfigError(
            f"train.precision={cfg.train.precision} is not supported by DeepSpeed on this "
            f"machine ({ctx.device.type}: no {cfg.train.precision} kernels in oneDNN/CUDA "
            f"here); supported here: {', '.join(supported)}. Use one of those, or "
            "train.engine=ddp, which runs every precision through torch autocast")


def _deepspeed_groups(exclude: Optional[dist.ProcessGroup]) -> List[dist.ProcessGroup]:
    """The process groups DeepSpeed created and caches (deepspeed.utils.groups), without the
    caller's own group, each once."""
    from deepspeed.utils import groups as ds_groups

    found: List[dist.ProcessGroup] = []
    for name, value in vars(ds_groups).items():
        if not (name.startswith("_") and name.endswith("GROUP")):
            continue
        for group in (value.values() if isinstance(value, dict) else [value]):
            if (isinstance(group, dist.ProcessGroup) and group is not exclude
                    and all(group is not g for g in found)):
                found.append(group)
    return found


# Keys of DeepSpeed's ZeRO-1/2 `optimizer.state_dict()` that hold Python objects
# (deepspeed.checkpoint.constants: LOSS_SCALER, ZERO_STAGE, PARAM_SLICE_MAPPINGS).
_LOSS_SCALER, _ZERO_STAGE, _SLICES = "loss_scaler", "zero_stage", "param_slice_mappings"
# Where the loss scaler's attributes go instead (a key DeepSpeed does not read).
SCALER_STATE = "facetrain_loss_scaler_state"


def plain_zero_state(sd: Dict[str, Any]) -> Dict[str, Any]:
    """DeepSpeed's ZeRO partition state with its objects replaced by plain values: the loss
    scaler by {"type", "attrs"} (its attributes: scale, counters, window), the stage enum by its
    int, each parameter's fragment address by {"numel", "start"}. DeepSpeed's load reads none of
    the replaced keys except the scaler, which `DeepSpeedEngine.load_state_dict` restores."""
    out = dict(sd)
    scaler = out.pop(_LOSS_SCALER, None)
    if scaler is not None:
        out[SCALER_STATE] = {"type": type(scaler).__name__, "attrs": dict(vars(scaler))}
    if isinstance(out.get(_ZERO_STAGE), enum.Enum):
        out[_ZERO_STAGE] = int(out[_ZERO_STAGE].value)
    if _SLICES in out:
        out[_SLICES] = [{name: {"numel": int(a.numel), "start": int(a.start)}
                         for name, a in group.items()} for group in out[_SLICES]]
    return out


def restore_loss_scaler(scaler: Any, saved: Optional[Dict[str, Any]]) -> None:
    """Set the saved attributes on this run's loss scaler (the same class; a scaler of another
    class, after a precision change, keeps its fresh state)."""
    if scaler is None or saved is None or saved.get("type") != type(scaler).__name__:
        return
    for name, value in saved["attrs"].items():
        if hasattr(scaler, name):
            setattr(scaler, name, value)


class DeepSpeedEngine:
    """The `Engine` surface over a DeepSpeed engine."""

    name = "deepspeed"

    def __init__(self, cfg: Config, ctx: DistContext, backbone: torch.nn.Module,
                 head: Classifier) -> None:
        if not ctx.distributed or ctx.group is not dist.group.WORLD:
            raise ConfigError("train.engine=deepspeed needs torchrun (a world process group; "
                              "DeepSpeed's data-parallel group is the world); use train.engine=ddp "
                              "for a single process")
        check_precision(cfg, ctx)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")
        try:
            import deepspeed
        except ImportError as err:
            raise ImportError("train.engine=deepspeed needs DeepSpeed: pip install "
                              "'facetrain[deepspeed]'") from err
        if ctx.device.type == "cpu":
            _skip_cpu_shm_comm_build(deepspeed)
        self.cfg, self.ctx, self.head = cfg, ctx, head
        self.head_opt = build_head_optimizer(cfg, head.parameters())
        backbone_opt = build_optimizer(cfg.optim, backbone.parameters())
        for group in backbone_opt.param_groups:
            # ZeRO's elastic checkpoint records param_groups[0]["step"] and asserts on it when
            # re-partitioning; torch's SGD/Adam keep no such key (unused by them otherwise).
            group.setdefault("step", 0)
        self.model, self.zero_opt, _, _ = deepspeed.initialize(
            model=backbone, optimizer=backbone_opt, config=ds_config(cfg),
            dist_init_required=False)
        self.backbone = self.model.module
        self.in_dtype: Optional[torch.dtype] = PRECISION_DTYPES.get(cfg.train.precision)

    @property
    def optimizers(self) -> List[Any]:
        return [self.zero_opt, self.head_opt]

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached global mean loss."""
        if self.in_dtype is not None:
            images = images.to(self.in_dtype)          # DeepSpeed casts the module itself
        emb = undo_gradient_averaging(self.model(images).float(), self.ctx.world_size)
        loss = self.head(emb, labels)
        self.model.backward(loss)
        if not sync:
            self.model.step()                          # not a boundary: only counts
        return loss.detach()

    def step(self) -> None:
        """Boundary step: DeepSpeed reduces, clips and steps the backbone; then the classifier
        steps unless DeepSpeed skipped the step for an fp16 overflow."""
        if self.cfg.train.precision == "fp16":
            # DeepSpeed's loss scale also multiplied the classifier's gradients.
            inv = 1.0 / float(self.zero_opt.loss_scale)
            for p in self.head.parameters():
                if p.grad is not None:
                    p.grad.mul_(inv)
        self.model.step()
        if self.cfg.train.precision != "fp16" or self.model.was_step_applied():
            self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)

    def close(self, finished: bool) -> None:
        """Tear down what `deepspeed.initialize` created: the engine's hooks and the gloo/NCCL
        process groups DeepSpeed made for itself and caches in module globals, which nothing
        else would release before interpreter finalization. A gloo group still alive then has
        worker threads that may need the GIL to drop their last tensors; Python ends such a
        thread with pthread_exit, which unwinds through C++ noexcept frames and aborts the
        process ("terminate called without an active exception", SIGABRT at exit). Destroying
        the groups here joins those threads while the interpreter is still whole.

        On success every rank first meets at a barrier on the caller's group, so no rank closes
        a group a peer still communicates over. After an error on this rank there is no
        barrier (the peers may be elsewhere): the groups are dropped without it."""
        if self.model is None:
            return
        from deepspeed import comm as ds_comm

        if finished and self.ctx.distributed and dist.is_initialized():
            dist.barrier(group=self.ctx.group)
        self.model.destroy()
        # The engine hooks itself onto the backbone we keep (for export and evaluation); those
        # hooks would keep it, its optimizer and their groups alive for as long as the module.
        for handle in ("module_forward_pre_hook", "module_forward_post_hook"):
            hook = getattr(self.model, handle, None)
            if hook is not None:
                hook.remove()
        for param in self.backbone.parameters():     # DeepSpeed tags each with its group
            for key, value in list(vars(param).items()):
                if isinstance(value, dist.ProcessGroup):
                    delattr(param, key)
        for group in _deepspeed_groups(exclude=self.ctx.group):
            if dist.is_initialized():
                ds_comm.destroy_process_group(group)
        self.model = self.zero_opt = None
        gc.collect()        # the engine's reference cycles hold the groups too

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Replicated: the backbone weights (ZeRO stage 1/2 keeps them whole). Per rank: the
        classifier block's optimizer and this rank's ZeRO partition."""
        return {"replicated": {"backbone": self.backbone.state_dict(), "engine": "deepspeed",
                               "zero_stage": self.cfg.train.zero_stage},
                "shard": {**self.head.optimizer_state(self.head_opt),
                          "zero_optim": plain_zero_state(self.zero_opt.state_dict())}}

    def load_state_dict(self, states: Sequence[Dict[str, Dict[str, Any]]],
                        world_size: int) -> None:
        """See `Engine.load_state_dict`. Reads every saved rank's entry: ZeRO re-partitions
        from all of them (also for another number of ranks)."""
        rep = states[self.ctx.rank if len(states) == world_size else 0]["replicated"]
        if rep.get("engine") != "deepspeed":
            raise ConfigError("this checkpoint was written by the ddp engine; resume it with "
                              "train.engine=ddp (optimizer states of the two engines differ)")
        self.backbone.load_state_dict(rep["backbone"])
        rank_parts = Entries(states, "shard")
        self.head.load_optimizer_state(self.head_opt, rank_parts, world_size)
        # Weights were loaded into the module above; the fp32 partitions are refreshed from it.
        parts = [dict(rank_parts[r]["zero_optim"]) for r in range(len(rank_parts))]
        scalers = [p.pop(SCALER_STATE, None) for p in parts]
        self.zero_opt.load_state_dict(parts, load_optimizer_states=True,
                                      load_from_fp32_weights=False)
        # DeepSpeed takes the global state (the loss scale) from its own rank's partition.
        restore_loss_scaler(getattr(self.zero_opt, "loss_scaler", None),
                            scalers[self.ctx.rank if self.ctx.rank < len(scalers) else 0])
