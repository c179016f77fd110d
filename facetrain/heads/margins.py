"""Cosine-logit margins (CosFace, ArcFace, combined), with room for LEAP's angle on the target.

Target logit  s * (cos(clip(theta_y + alpha_y + m_arc, 0, pi)) - m_cos)
other logits  s * cos(clip(theta_j + alpha_j, 0, pi))          (alpha = 0 without LEAP)

Gradient treatment (unlike InsightFace's margin, which runs under no_grad and so passes the
gradient straight through as if the margin were the identity): we back-propagate the exact
derivative of the formula above, d/dcos = sin(theta') / sin(theta). `cos` is clamped to
[-1 + EPS, 1 - EPS] before arccos, which bounds that ratio by 1/sqrt(2 EPS) and makes it 0 at
exactly +-1; clipping the angle to [0, pi] gives sin(theta') = 0, i.e. no gradient, at the ends.
Entries that carry neither margin nor perturbation keep `cos` itself (exact, gradient 1).
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, Tuple

import torch

from facetrain.config import MarginConfig

# Clamp for arccos: fp32 resolves 1 - 6e-8, so 1e-6 keeps acos' derivative finite (<= ~707).
EPS = 1e-6


def margin_values(margin: MarginConfig) -> Tuple[float, float]:
    """(m_cos, m_arc) actually applied for margin.kind (the other one is 0)."""
    m_cos = margin.m_cos if margin.kind in ("cosface", "combined") else 0.0
    m_arc = margin.m_arc if margin.kind in ("arcface", "combined") else 0.0
    return m_cos, m_arc


def angle(cos: torch.Tensor) -> torch.Tensor:
    """arccos of `cos` clamped to [-1 + EPS, 1 - EPS] (finite gradient)."""
    return torch.acos(cos.clamp(-1.0 + EPS, 1.0 - EPS))


def target_cos(cos_t: torch.Tensor, alpha_t: torch.Tensor, m_cos: float | torch.Tensor,
               m_arc: float | torch.Tensor) -> torch.Tensor:
    """Margin (and LEAP angle) on the target cosines only.

    cos_t [B] fp32: cosine of each sample to its own class; alpha_t [B]: its LEAP angle at the
    target logit (0 where unperturbed); margins scalars or [B]. Returns [B] (unscaled). O(B),
    plain autograd.
    """
    m_arc = torch.as_tensor(m_arc, dtype=cos_t.dtype, device=cos_t.device)
    angular = torch.cos(torch.clamp(angle(cos_t) + alpha_t + m_arc, 0.0, math.pi)) - m_cos
    # Entries with neither an angular margin nor a perturbation stay exactly cos - m_cos.
    return torch.where((alpha_t != 0) | (m_arc != 0), angular, cos_t - m_cos)


class Perturbation(Protocol):
    """An angle perturbation of a logit block (LEAP's: facetrain.heads.feature_cloud.Cloud)."""

    def block_logits(self, cos_blk: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled, perturbed logits [B, C_s] of the block, targets margin-free."""

    def target_alpha(self, target_col: torch.Tensor, num_cols: int) -> torch.Tensor:
        """Each sample's angle at its target column [B]."""


def margin_logits(cos_blk: torch.Tensor, target_col: torch.Tensor, is_local: torch.Tensor,
                  margin: MarginConfig, cloud: Optional[Perturbation] = None) -> torch.Tensor:
    """Scaled logits of one shard's block, margin on the targets this shard owns.

    cos_blk [B, C_s] fp32 (sharded over classes, replicated over the global batch);
    target_col [B] int64: column of each sample's class in this block (any valid column where
    is_local [B] is False); cloud: LEAP's per-sample std and noise keys (None = no perturbation).
    Returns [B, C_s] fp32.
    """
    m_cos, m_arc = margin_values(margin)
    col = target_col.view(-1, 1)
    cos_t = cos_blk.gather(1, col).squeeze(1)
    if cloud is None:
        logits = cos_blk * margin.scale
        alpha_t = torch.zeros_like(cos_t)
    else:
        logits = cloud.block_logits(cos_blk, margin.scale)
        alpha_t = cloud.target_alpha(target_col, cos_blk.shape[1])
    # Every row rewrites its target column. A row whose class lives on another shard rewrites
    # (column 0) with its own value, margin-free: a no-op that avoids a host sync to select the
    # local rows. The values come from an O(B) side path on cos_blk, so the in-place scatter
    # never touches a tensor autograd saved, and the gradient of the overwritten entries flows
    # through that side path.
    loc = is_local.to(cos_t.dtype)
    val = target_cos(cos_t, alpha_t, m_cos * loc, m_arc * loc) * margin.scale
    return logits.scatter_(1, col, val.view(-1, 1))
