"""MagFace (Meng et al., CVPR 2021): a margin that grows with the embedding's magnitude, and a
regulariser that rewards a large magnitude, so the magnitude learns to mean quality.

  a_n     = clip(|f_n|, a_min, a_max)                       (with gradient)
  m(a)    = m_min + (m_max - m_min) (a - a_min) / (a_max - a_min)
  target  s cos(clip(theta_y + alpha_y + m(a_n), 0, pi))    (ArcFace's form with m(a))
  loss    CE + lambda_g mean_n g(a_n),   g(a) = 1 / a + a / a_max^2

Defaults are the paper's for MS1MV2 (a in [10, 110], m in [0.45, 0.8], lambda_g = 35; configs
set lambda_g). The paper's code falls back to cos - m sin(m) past pi - m; we clip the angle as
ArcFace does here.

Where the magnitude comes from: PartialFC receives the backbone's embeddings un-normalised and
all-gathers them with their gradient, so each rank computes every |f_n| (StepInputs.norms). The
margin's gradient flows to the embedding through the rank that owns the sample's class; the
regulariser is computed on the whole gathered batch on every rank, so its gradient is scaled by
1 / world size (the all-gather's backward sums the ranks' contributions).
"""
from __future__ import annotations

from typing import Optional

import torch

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs, target_cos


@register("magface")
class MagFace(MarginKind):
    uses_norms = True

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.a_min, self.a_max = cfg.mag_a_min, cfg.mag_a_max
        self.m_min, self.m_max = cfg.mag_m_min, cfg.mag_m_max
        self.lambda_g = cfg.lambda_g
        self.margin_n: Optional[torch.Tensor] = None
        self.mag: Optional[torch.Tensor] = None

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        if inputs is None or inputs.norms is None:
            raise ValueError("magface needs the embeddings' norms: call it through PartialFC")
        a = inputs.norms.to(cos_t.dtype).clamp(self.a_min, self.a_max)
        self.mag = a
        self.margin_n = self.m_min + (self.m_max - self.m_min) * (a - self.a_min) / (
            self.a_max - self.a_min)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        # Rows of other ranks' classes (loc = 0) get their own value, margin-free: their (zero)
        # gradient to the magnitude comes only from the owning rank.
        return target_cos(cos_t, alpha_t, 0.0, self.margin_n * loc)

    def extra_loss(self, world_size: int) -> Optional[torch.Tensor]:
        if self.lambda_g == 0:
            return None
        a = self.mag
        reg = self.lambda_g * (1.0 / a + a / (self.a_max * self.a_max)).mean()
        return reg.detach() + (reg - reg.detach()) / world_size
