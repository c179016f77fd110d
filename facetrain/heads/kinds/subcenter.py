"""Sub-center ArcFace (Deng et al., ECCV 2020): K weight vectors per class, the class's cosine is
the best of them, then ArcFace's margin (m = head.margin.m_arc, K = head.margin.subcenters).

  cos(theta_j) = max_k cos(f, W_{j,k});  target s cos(clip(theta_y + alpha_y + m, 0, pi))

The max is taken where the cosines are made (PartialFC.shard_logits: with K > 1 the weight is
[C_local, K, D] and the [N, C_s * K] cosines are reduced to [N, C_s] before anything else), so
LEAP, sampling and the softmax see one cosine per class and the margin is ArcFace's. Because
the class is dim 0 of the weight, all K sub-centres of a class live on one shard, class sampling
keeps or drops a class whole, and checkpoints and optimizer state reshard by class unchanged.
The gradient of the max goes to the best sub-centre only. Not done: the paper's later step of
dropping non-dominant sub-centres to clean noisy data.
"""
from __future__ import annotations

import torch

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind


@register("subcenter")
class SubCenterArcFace(MarginKind):
    """ArcFace on the best sub-centre's cosine (the max lives in PartialFC.shard_logits)."""

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.m_cos, self.m_arc = 0.0, cfg.m_arc
        self.subcenters = cfg.subcenters

    def class_cosines(self, cos: torch.Tensor) -> torch.Tensor:
        """[N, C_s * K] cosines to every sub-centre (class-major) -> [N, C_s], the best of each
        class's K (its gradient goes to that one)."""
        return cos.view(cos.shape[0], -1, self.subcenters).max(dim=2).values
