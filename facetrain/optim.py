"""Optimizers and learning-rate schedules.

Schedules count OPTIMIZER steps (not micro-batches), so a run with gradient accumulation
follows the same curve per sample as one without. Every schedule is a pure function of the step
(`LRSchedule.lr_at`), which makes resuming trivial: the trainer's step counter is the state, so
a schedule has no checkpoint state of its own (checkpoints written before this keep a "schedule"
entry, which is ignored).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from facetrain.config import Config, ConfigError, OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), AdamW (decoupled decay) or Adam (L2 decay, the paper's re-ID
    setting). Weight decay applies to every parameter, as in InsightFace's arcface_torch.

    The trainer builds one optimizer for the replicated backbone and one for this rank's
    classifier block, so the block's state (momentum rows) stays with its classes.
    """
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name must be one of sgd, adamw, adam; got {cfg.name!r}")


def build_head_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The classifier block's optimizer: `build_optimizer`, or `SampledRowSGD` when
    head.update_rows=sampled (config validation has already required optim.name=sgd)."""
    if cfg.head.update_rows == "sampled":
        params = [p for p in params if p.requires_grad]
        return SampledRowSGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                             weight_decay=cfg.optim.weight_decay)
    return build_optimizer(cfg.optim, params)


class SampledRowSGD(torch.optim.Optimizer):
    """Momentum SGD that moves only the rows present in a sparse gradient.

    Why: with class sampling a step's classifier gradient lives on k of the block's C rows.
    torch's SGD, fed a dense gradient, still decays and moves all C rows and their momentum (a
    full pass over weight, gradient and momentum per step: 3 x 4 GB at 2M x 512 fp32). Here the
    head (head.update_rows=sampled) hands over a sparse gradient of the sampled rows, built
    coalesced, and the step reads and writes only those k rows, with no host sync unless
    micro-batches were accumulated. A class that is not sampled keeps its weight and momentum
    until it is sampled again (lazy decay and momentum, as in InsightFace's first PartialFC):
    a different trajectory from the dense update, not an approximation of it.

    A dense gradient gets exactly torch.optim.SGD's update (dampening 0, no Nesterov), so
    sample_rate=1 is unchanged. The state is SGD's `momentum_buffer` (dense, like the weight),
    so checkpoints of either optimizer load into the other and reshard by class rows.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SampledRowSGD: lr, momentum and weight_decay must be >= 0; got "
                             f"{lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                rows = None
                if grad.is_sparse:
                    if not grad.is_coalesced():
                        grad = grad.coalesce()             # repeated rows are summed
                    rows, grad = grad._indices()[0], grad._values()
                weight = p if rows is None else p.index_select(0, rows)
                d = grad.add(weight, alpha=decay) if decay else grad
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        # Zero rows: the first touch gives buf = d, as torch's SGD's clone does.
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    if rows is None:
                        d = buf.mul_(momentum).add_(d)
                    else:
                        d = buf.index_select(0, rows).mul_(momentum).add_(d)
                        buf.index_copy_(0, rows, d)
                if rows is None:
                    p.add_(d, alpha=-lr)
                else:
                    p.index_add_(0, rows, d, alpha=-lr)
        return loss


class LRSchedule:
    """Learning rate as a function of the optimizer step.

    - warm-up (all schedules): linear from 0 to `base_lr` over `warmup_epochs`;
    - poly: `base_lr * (1 - t)^power` over the remaining steps, floored at `min_lr`;
    - cyclic: Smith's triangular policy, `min_lr -> base_lr -> min_lr` in each cycle of
      `cycle_epochs` (cycle k starts at epoch k * cycle_epochs; the paper's face protocol starts
      the feature cloud at the start of the third cycle, i.e. `leap.start_epoch = 2 * cycle_epochs`);
    - step: `base_lr * gamma^(number of milestones <= current epoch)`;
    - constant.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int,
                 total_steps: int) -> None:
        if steps_per_epoch < 1:
            raise ConfigError(f"the schedule needs at least one optimizer step per epoch; got "
                              f"{steps_per_epoch} (fewer batches than optim.grad_accum?)")
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def lr_at(self, step: int) -> float:
        """The learning rate used for optimizer step `step` (0-based)."""
        cfg = self.cfg
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        epoch = step / self.steps_per_epoch
        if cfg.name == "constant":
            return self.base_lr
        if cfg.name == "poly":
            span = max(self.total_steps - self.warmup_steps, 1)
            t = min((step - self.warmup_steps) / span, 1.0)
            return max(self.base_lr * (1.0 - t) ** cfg.power, cfg.min_lr)
        if cfg.name == "cyclic":
            cycle_steps = cfg.cycle_epochs * self.steps_per_epoch
            pos = (step % cycle_steps) / cycle_steps          # 0 .. 1 within the cycle
            tri = 1.0 - abs(2.0 * pos - 1.0)                  # 0 -> 1 -> 0
            return cfg.min_lr + (self.base_lr - cfg.min_lr) * tri
        if cfg.name == "step":
            passed = sum(1 for m in cfg.milestones if epoch >= m)
            return self.base_lr * cfg.gamma ** passed
        raise ConfigError(f"schedule.name must be one of poly, cyclic, step, constant; "
                          f"got {cfg.name!r}")

    def apply(self, optimizers: Sequence[torch.optim.Optimizer], step: int,
              scales: Optional[Sequence[float]] = None) -> float:
        """Set the learning rate of every param group for optimizer step `step`; returns it.
        `scales[i]` multiplies optimizer i's rate (optim.backbone_lr_scale); None = all 1."""
        lr = self.lr_at(step)
        for i, opt in enumerate(optimizers):
            scale = 1.0 if scales is None else float(scales[i])
            for group in opt.param_groups:
                group["lr"] = lr if scale == 1.0 else lr * scale
        return lr
