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
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs, angle


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
        s = self.scale
        hard = logits.detach() > (s * self.threshold).unsqueeze(1)
        return torch.where(hard, logits * (self.t + logits / s), logits)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self._margin_target(cos_t, alpha_t)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"t": self.t.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], where: str) -> None:
        if set(state) != {"t"}:
            raise ValueError(f"{where}: curricularface expects margin state {{'t'}}; got "
                             f"{sorted(state)}")
        self.t.copy_(state["t"])
