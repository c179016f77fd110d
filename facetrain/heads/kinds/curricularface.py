"""CurricularFace (Huang et al., CVPR 2020): ArcFace on the target, hard negatives re-weighted by
an adaptive t as training progresses.

  target            s * cos(clip(theta_y + alpha_y + m, 0, pi)) =: s * T_n      (m = m_arc)
  other logit c'_j  s * c'_j                      if c'_j <= T_n
                    s * c'_j * (t + c'_j)         if c'_j >  T_n  (a hard negative)
  t <- rate * mean_n cos(theta_y,n) + (1 - rate) * t    each training forward, before use
                                                        (rate = stat_momentum, t_0 = 0)

c'_j is the (LEAP-perturbed) cosine of logit j and T_n the sample's perturbed target with its
margin; t follows the plain target cosine (what the paper's t measures: how well the model fits,
not LEAP's noise). The paper writes t = alpha r + (1 - alpha) t with alpha = 0.99 but its
released code weights the new batch by 0.01; stat_momentum = 0.01 follows the code.

Sharding: the target cosine and T_n of sample n exist only on the rank that owns its class, so
one all-reduce of a [2, N] vector gives every rank every sample's threshold and the global mean
(with sampling every positive class is kept, so the mean is over the whole global batch). t is
replicated, saved with the head and needs no resharding. The mask and t carry no gradient (as in
the paper's code); a hard negative's derivative is s * (t + 2 c').

Cost: the modulation is one autograd node, `_HardNegatives` (on the scaled block x = s c':
x (t + x / s), derivative t + 2 x / s). Plain autograd on `torch.where(hard, x * (t + x / s), x)`
took ~10 passes over the [B, C_s] block, three of them `where` (a scalar loop on CPU), and kept
several [B, C_s] tensors; the fused forward is six vectorised passes (no `where`) and keeps one
tensor, the derivative, so its backward is one multiply. The output is bitwise the old formula's.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs, angle


class _HardNegatives(torch.autograd.Function):
    """x (t + x / s) where x > bound (a hard negative), x elsewhere, on a scaled block x [B, C];
    bound [B, 1] and t carry no gradient. Bitwise `torch.where(x > bound, x * (t + x / s), x)`.

    On CPU `torch.where` and masked ops are scalar loops (~4x a vectorised pass), so the mask is
    a 0/1 block m in x's dtype and the selection a `lerp` with m as weight, which is exact at 0
    and 1: f = lerp(1, t + x / s, m) (the bracket of the formula on hard entries, 1 elsewhere),
    out = x * f (x * 1 = x). The backward's factor t + 2 x / s on hard entries, 1 elsewhere, is
    f + m x / s: one more pass, done in the forward only when a gradient will be taken (`keep`;
    under no_grad needs_input_grad still says True), and the only tensor kept (the block x itself
    and the mask are freed)."""

    @staticmethod
    def forward(ctx, x, bound, t, scale, keep):  # type: ignore[override]
        hard = torch.gt(x, bound, out=torch.empty_like(x))
        f = torch.div(x, scale).add_(t)                  # the old formula's t + x / s, same ops
        torch.lerp(torch.ones((), dtype=x.dtype, device=x.device), f, hard, out=f)
        if keep:
            ctx.save_for_backward(torch.addcmul(f, hard, x, value=1.0 / scale))
        return f.mul_(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None


@register("curricularface")
class CurricularFace(MarginKind):
    own_value_on_other_rows = False

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.m = cfg.m_arc
        self.rate = cfg.stat_momentum
        self.t = torch.zeros((), dtype=torch.float32, device=device)
        self.threshold: Optional[torch.Tensor] = None

    def _margin_target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
        return torch.cos(torch.clamp(angle(cos_t) + alpha_t + self.m, 0.0, math.pi))

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        with torch.no_grad():
            zero = torch.zeros_like(cos_t)
            packed = torch.stack([torch.where(is_local, cos_t, zero),
                                  torch.where(is_local, self._margin_target(cos_t, alpha_t), zero)])
            group = None if inputs is None else inputs.group
            if group is not None:
                # Each entry is non-zero on exactly one rank: the sum is exact.
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            if inputs is not None and inputs.training:
                self.t.mul_(1.0 - self.rate).add_(self.rate * packed[0].mean())
            self.threshold = packed[1]

    def others(self, logits: torch.Tensor) -> torch.Tensor:
        bound = (self.scale * self.threshold).unsqueeze(1)
        keep = torch.is_grad_enabled() and logits.requires_grad
        return _HardNegatives.apply(logits, bound, self.t, self.scale, keep)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self._margin_target(cos_t, alpha_t)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"t": self.t.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], where: str) -> None:
        if set(state) != {"t"}:
            raise ValueError(f"{where}: curricularface expects margin state {{'t'}}; got "
                             f"{sorted(state)}")
        self.t.copy_(state["t"])
