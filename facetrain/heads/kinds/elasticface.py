"""ElasticFace (Boutros et al., CVPRW 2022): a margin drawn per sample and step from N(m, sigma).

  arc form  target s * cos(clip(theta_y + alpha_y + m_n, 0, pi))      m = head.margin.m_arc
  cos form  target s * (cos(clip(theta_y + alpha_y, 0, pi)) - m_n)    m = head.margin.m_cos
  m_n = m + sigma * z_n   (training; m itself in eval)

z_n comes from the head's counter-based stream (facetrain/heads/noise.py, `sample_gauss`): keyed
on the step's draw counter and the sample's position in the global batch, so 1, 2 or 3 ranks and
a resumed run draw the same margins, and LEAP's angles (same counter, other salt) stay
independent of them. The paper does not clip the angle; we clip as ArcFace does here
(facetrain/heads/margins.py), which only matters when theta + m > pi.
"""
from __future__ import annotations

from typing import Optional

import torch

from facetrain.config import MarginConfig
from facetrain.heads import noise
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs, target_cos

SALT = 0xE1A5  # the margin's stream inside the head's counter-based noise


class _ElasticFace(MarginKind):
    uses_noise = True
    arc = True

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.mean = cfg.m_arc if self.arc else cfg.m_cos
        self.sigma = cfg.sigma
        self.margin_n: Optional[torch.Tensor] = None

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        if inputs is None or not inputs.training or self.sigma == 0:
            self.margin_n = torch.full_like(cos_t, self.mean)
            return
        z = noise.sample_gauss(inputs.noise_seed, inputs.counter, cos_t.shape[0], SALT)
        self.margin_n = self.mean + self.sigma * z.to(cos_t.device, cos_t.dtype)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        m = self.margin_n * loc
        return target_cos(cos_t, alpha_t, 0.0, m) if self.arc else target_cos(cos_t, alpha_t, m, 0.0)


@register("elasticface_arc")
class ElasticArcFace(_ElasticFace):
    """ElasticFace-Arc: the per-sample margin is added to the target angle."""

    arc = True


@register("elasticface_cos")
class ElasticCosFace(_ElasticFace):
    """ElasticFace-Cos: the per-sample margin is subtracted from the target cosine."""

    arc = False
