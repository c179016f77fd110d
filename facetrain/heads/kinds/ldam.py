"""LDAM (Cao et al., NeurIPS 2019): a label-distribution-aware margin, larger for rarer classes.

  m_j     = ldam_max_m * (K_min / K_j)^(1/4)       (the rarest class gets ldam_max_m)
  target  s * (cos(clip(theta_y + alpha_y, 0, pi)) - m_y)    (CosFace's form with m_y)

K_j are the global class counts the dataset reports (a class with no image counts as one). Its
deferred re-weighting option (LDAM-DRW) is the class-balanced loss switched on late:
head.class_balance_beta (0.9999 in the paper) with head.class_balance_start_epoch.
"""
from __future__ import annotations

from typing import Optional

import torch

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs, target_cos


@register("ldam")
class LDAM(MarginKind):
    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.max_m = cfg.ldam_max_m
        self.class_margin: Optional[torch.Tensor] = None
        self.margin_n: Optional[torch.Tensor] = None

    def set_class_counts(self, counts: torch.Tensor) -> None:
        if int(counts.sum()) <= 0:
            # Without K_i every class would get ldam_max_m: CosFace under another name.
            raise ValueError("head.margin.kind=ldam sets each class's margin from the class "
                             "counts K_i, but the training data reports none")
        k = counts.clamp(min=1).double()
        self.class_margin = (self.max_m * (k.min() / k) ** 0.25).float()

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        if inputs is None or self.class_margin is None:
            raise ValueError("ldam needs the class counts and labels: call it through PartialFC")
        self.margin_n = self.class_margin[inputs.labels].to(cos_t.dtype)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return target_cos(cos_t, alpha_t, self.margin_n * loc, 0.0)
