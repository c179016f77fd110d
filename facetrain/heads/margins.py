"""Cosine-logit margins (CosFace, ArcFace, combined) and the LEAP angle perturbation.

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
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from facetrain.config import MarginConfig
from facetrain.heads import noise as _noise

# Clamp for arccos: fp32 resolves 1 - 6e-8, so 1e-6 keeps acos' derivative finite (<= ~707).
EPS = 1e-6


def margin_values(margin: MarginConfig) -> Tuple[float, float]:
    """(m_cos, m_arc) actually applied for margin.kind (the other one is 0)."""
    m_cos = margin.m_cos if margin.kind in ("cosface", "combined") else 0.0
    m_arc = margin.m_arc if margin.kind in ("arcface", "combined") else 0.0
    return m_cos, m_arc


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + EPS, 1.0 - EPS))


def target_cos(cos_t: torch.Tensor, alpha_t: torch.Tensor, m_cos: float | torch.Tensor,
               m_arc: float | torch.Tensor) -> torch.Tensor:
    """Margin (and LEAP angle) on the target cosines only.

    cos_t [B] fp32: cosine of each sample to its own class; alpha_t [B]: its LEAP angle at the
    target logit (0 where unperturbed); margins scalars or [B]. Returns [B] (unscaled). O(B),
    plain autograd.
    """
    m_arc = torch.as_tensor(m_arc, dtype=cos_t.dtype, device=cos_t.device)
    angular = torch.cos(torch.clamp(_angle(cos_t) + alpha_t + m_arc, 0.0, math.pi)) - m_cos
    # Entries with neither an angular margin nor a perturbation stay exactly cos - m_cos.
    return torch.where((alpha_t != 0) | (m_arc != 0), angular, cos_t - m_cos)


class Cloud(NamedTuple):
    """LEAP feature cloud of one step: std [B, 1] per sample (0 = not perturbed) and the noise
    keys of facetrain.heads.noise (row_key [B, 1], col_key [1, C_s] or [1, 1])."""

    std: torch.Tensor
    row_key: torch.Tensor
    col_key: torch.Tensor


def _perturbed_angle(cos_blk, std, row_key, col_key):
    return torch.clamp(_angle(cos_blk) + std * _noise.gauss(row_key, col_key), 0.0, math.pi)


def cloud_forward(cos_blk: torch.Tensor, std: torch.Tensor, row_key: torch.Tensor,
                  col_key: torch.Tensor, scale: float) -> torch.Tensor:
    """One elementwise expression (fusable by torch.compile, noise drawn inline, logit scale
    folded in): s * cos(clip(acos(c) + std * z, 0, pi)) on rows with std > 0, s * c elsewhere."""
    out = torch.where(std > 0, torch.cos(_perturbed_angle(cos_blk, std, row_key, col_key)), cos_blk)
    return out * scale


def cloud_backward(grad: torch.Tensor, cos_blk: torch.Tensor, std: torch.Tensor,
                   row_key: torch.Tensor, col_key: torch.Tensor, scale: float) -> torch.Tensor:
    """d out / d cos = sin(theta') / sin(theta) on perturbed rows, recomputing theta' (and the
    noise) instead of storing them; 0 where the clamp bites (|c| >= 1 - EPS) or the clip does
    (theta' in {0, pi}, so sin(theta') = 0); 1 on unperturbed rows."""
    inside = (cos_blk > -1.0 + EPS) & (cos_blk < 1.0 - EPS)
    sin_out = torch.sin(_perturbed_angle(cos_blk, std, row_key, col_key))
    sin_in = torch.sqrt(torch.clamp(1.0 - cos_blk * cos_blk, min=2.0 * EPS))
    ratio = torch.where(inside, sin_out / sin_in, torch.zeros_like(sin_out))
    return torch.where(std > 0, grad * ratio, grad) * scale


_FUSED: Dict[str, Callable] = {}


def _maybe_fused(name: str, fn: Callable, like: torch.Tensor) -> Callable:
    """On CUDA, `fn` compiled by torch.compile into one kernel (eager it is ~20 passes over the
    [B, C] block, the bulk of LEAP's cost); eager on CPU, with FACETRAIN_COMPILE_LEAP=0, or if
    compiling fails (warned once)."""
    if not like.is_cuda or os.environ.get("FACETRAIN_COMPILE_LEAP", "1") == "0":
        return fn
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _FUSED[name]


def call_fused(name: str, fn: Callable, *args):
    """fn(*args), compiled on CUDA (see _maybe_fused); args[0] must be a tensor."""
    impl = _maybe_fused(name, fn, args[0])
    if impl is fn:
        return fn(*args)
    try:
        return impl(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the same math
        warnings.warn(f"LEAP: torch.compile of {name} failed ({type(exc).__name__}: {exc}); using "
                      "the eager version (set FACETRAIN_COMPILE_LEAP=0 to skip compiling)")
        _FUSED[name] = fn
        return fn(*args)


class _CloudCos(torch.autograd.Function):
    """LEAP perturbation of a whole logit block. Backward keeps only the input block and the
    small keys (plain autograd would keep the noise and ~4 [B, C] intermediates)."""

    @staticmethod
    def forward(ctx, cos_blk, std, row_key, col_key, scale):  # type: ignore[override]
        ctx.save_for_backward(cos_blk, std, row_key, col_key)
        ctx.scale = scale
        return call_fused("cloud_forward", cloud_forward, cos_blk, std, row_key, col_key, scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cos_blk, std, row_key, col_key = ctx.saved_tensors
        grad_in = call_fused("cloud_backward", cloud_backward, grad.contiguous(), cos_blk, std,
                             row_key, col_key, ctx.scale)
        return grad_in, None, None, None, None


def _target_alpha(std, row_key, col_key, target_col, num_cols: int):
    """The target's own angle [B]: the same noise value the block used at that column."""
    ck = col_key.view(-1).expand(num_cols)[target_col].view(-1, 1)
    alpha_t = (std * _noise.gauss(row_key, ck)).view(-1)
    return torch.where(std.view(-1) > 0, alpha_t, torch.zeros_like(alpha_t))


def cloud_target_alpha(cloud: Cloud, target_col: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Each sample's angle at its target column [B] (0 where unperturbed): the value the
    block uses there. O(B); compiled on CUDA."""
    return call_fused("target_alpha", _target_alpha, cloud.std, cloud.row_key, cloud.col_key,
                      target_col, num_cols)


def margin_logits(cos_blk: torch.Tensor, target_col: torch.Tensor, is_local: torch.Tensor,
                  margin: MarginConfig, cloud: Optional[Cloud] = None) -> torch.Tensor:
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
        logits = _CloudCos.apply(cos_blk, cloud.std, cloud.row_key, cloud.col_key, margin.scale)
        alpha_t = cloud_target_alpha(cloud, target_col, cos_blk.shape[1])
    # Every row rewrites its target column. A row whose class lives on another shard rewrites
    # (column 0) with its own value, margin-free: a no-op that avoids a host sync to select the
    # local rows. The values come from an O(B) side path on cos_blk, so the in-place scatter
    # never touches a tensor autograd saved, and the gradient of the overwritten entries flows
    # through that side path.
    loc = is_local.to(cos_t.dtype)
    val = target_cos(cos_t, alpha_t, m_cos * loc, m_arc * loc) * margin.scale
    return logits.scatter_(1, col, val.view(-1, 1))
