"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality, read from the feature
norm before normalisation.

  ||z||_n  = clip(norm of sample n's embedding, 0.001, 100)       (no gradient)
  mu, sd  <- rate * (mean, unbiased std of ||z|| over the global batch) + (1 - rate) * (mu, sd)
             each training forward, before use (rate = stat_momentum; mu_0 = 20, sd_0 = 100)
  zhat_n   = clip(h * (||z||_n - mu) / (sd + 0.001), -1, 1)
  theta_y  = arccos(clip(cos_y, -1 + 0.001, 1 - 0.001))                (as the paper's code)
  target   s * (cos(clip(theta_y + alpha_y - m zhat_n, 0.001, pi - 0.001)) - (m + m zhat_n))
  others   s * c'_j (LEAP's perturbed cosine, or the cosine)

m = head.margin.m_arc (the paper's 0.4), h = head.margin.h (0.333). The target follows the
paper's released code exactly, its 0.001 clamp of the cosine included (so a target with
|cos| > 0.999 has no gradient, as there). The same code also clamps every non-target cosine to
[-1 + 0.001, 1 - 0.001]; we leave non-targets as every other kind does (docs/heads.md says why:
one more pass over the block, to change only logits with |cos| > 0.999).

Where the norm comes from: PartialFC receives the backbone's embeddings un-normalised (every
registered backbone returns them so, see facetrain/models/registry.py) and all-gathers them for
the softmax split by class blocks, so each rank computes every sample's norm itself: the statistics are
over the global batch, identical on every rank and for any world size, with no extra
communication. mu and sd are replicated, saved with the head and need no resharding.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind, StepInputs

NORM_CLIP = (0.001, 100.0)
EPS = 0.001


@register("adaface")
class AdaFace(MarginKind):
    own_value_on_other_rows = False
    uses_norms = True

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.m, self.h, self.rate = cfg.m_arc, cfg.h, cfg.stat_momentum
        self.norm_mean = torch.full((), 20.0, dtype=torch.float32, device=device)
        self.norm_std = torch.full((), 100.0, dtype=torch.float32, device=device)
        self.zhat: Optional[torch.Tensor] = None

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        if inputs is None:
            raise ValueError("adaface needs the embeddings' norms: call it through PartialFC")
        with torch.no_grad():
            norms = inputs.norms.to(torch.float32).clamp(*NORM_CLIP)
            if inputs.training:
                self.norm_mean.mul_(1.0 - self.rate).add_(self.rate * norms.mean())
                self.norm_std.mul_(1.0 - self.rate).add_(self.rate * norms.std())
            zhat = (norms - self.norm_mean) / (self.norm_std + EPS) * self.h
            self.zhat = zhat.clamp(-1.0, 1.0).to(cos_t.dtype)

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_t.clamp(-1.0 + EPS, 1.0 - EPS))
        theta = torch.clamp(theta + alpha_t - self.m * self.zhat, EPS, math.pi - EPS)
        return torch.cos(theta) - (self.m + self.m * self.zhat)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"norm_mean": self.norm_mean.detach().cpu().clone(),
                "norm_std": self.norm_std.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], where: str) -> None:
        if set(state) != {"norm_mean", "norm_std"}:
            raise ValueError(f"{where}: adaface expects margin state {{'norm_mean', 'norm_std'}}; "
                             f"got {sorted(state)}")
        self.norm_mean.copy_(state["norm_mean"])
        self.norm_std.copy_(state["norm_std"])
