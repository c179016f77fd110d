"""LEAP's feature cloud on the logits: a random angle added to the angle of every logit of a
perturbed sample, with a memory-lean autograd.

other logits  s * cos(clip(theta_j + alpha_j, 0, pi))    target: see margins.target_cos
alpha_j = std_n * z(row key, column key)                 (z: facetrain/heads/noise.py)

`Cloud` is one step's perturbation (per-sample std and noise keys). `Cloud.block_logits` runs the
whole [B, C_s] block through `_CloudCos`: on CUDA a compiled kernel (facetrain/heads/fused.py)
whose backward recomputes the angles and the noise instead of keeping them; on CPU the angles of
the perturbed rows only, keeping their backward factor. `Cloud.target_alpha` is each sample's
angle at its target column, which margins.margin_logits combines with the margin (compiled on
CUDA too). Gradient: d/dcos = sin(theta') / sin(theta), 0 where the arccos
clamp or the [0, pi] clip bites (margins.EPS).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from facetrain.heads import noise as _noise
from facetrain.heads.fused import call_fused
from facetrain.heads.margins import EPS, angle


class Cloud(NamedTuple):
    """LEAP feature cloud of one step: std [B, 1] per sample (0 = not perturbed) and the noise
    keys of facetrain.heads.noise (row_key [B, 1], col_key [1, C_s] or [1, 1])."""

    std: torch.Tensor
    row_key: torch.Tensor
    col_key: torch.Tensor

    def block_logits(self, cos_blk: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled, perturbed logits of a whole block [B, C_s] (the targets still margin-free)."""
        return _CloudCos.apply(cos_blk, self.std, self.row_key, self.col_key, scale)

    def target_alpha(self, target_col: torch.Tensor, num_cols: int) -> torch.Tensor:
        """Each sample's angle at its target column [B] (0 where unperturbed)."""
        return cloud_target_alpha(self, target_col, num_cols)


def _perturbed_angle(cos_blk, std, row_key, col_key):
    return torch.clamp(angle(cos_blk) + std * _noise.gauss(row_key, col_key), 0.0, math.pi)


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


def _forward_keep_ratio(cos_blk, std, row_key, col_key, scale):
    """cloud_forward's output, and cloud_backward's sin(theta') / sin(theta) factor on the
    perturbed rows only ([R, C], with those rows' indices [R]), from one computation of the
    perturbed angle.

    Only the rows of perturbed samples (std > 0: tail classes with statistics, about half of
    the main job's batch late in training) change; the others are s * c, and their backward
    factor is 1. So the angle, its cosine and sine and the factor
    are computed on the perturbed rows alone, with the same elementwise ops on the same values
    as over the whole block: the same bits (tests/unit/test_leap_noise_pinned.py compares them
    with the whole-block formulas). z is drawn for those rows only: it is a function of the hash's two
    16-bit halves alone, so a row drawn apart has the same bits as in the whole block."""
    rows = torch.nonzero(std.view(-1) > 0).view(-1)           # a host sync: CPU path only
    out = cos_blk * scale
    if not rows.numel():
        return out, cos_blk.new_empty((0, cos_blk.shape[1])), rows
    c = cos_blk.index_select(0, rows)
    s_r = std.index_select(0, rows)
    theta = torch.clamp(angle(c) + s_r * _noise.gauss(row_key.index_select(0, rows), col_key),
                        0.0, math.pi)
    out.index_copy_(0, rows, torch.cos(theta) * scale)
    inside = (c > -1.0 + EPS) & (c < 1.0 - EPS)
    sin_out = torch.sin(theta)
    sin_in = torch.sqrt(torch.clamp(1.0 - c * c, min=2.0 * EPS))
    ratio = torch.where(inside, sin_out / sin_in, torch.zeros_like(sin_out))
    return out, ratio, rows


class _CloudCos(torch.autograd.Function):
    """LEAP perturbation of a whole logit block. Backward keeps only the input block and the
    small keys (plain autograd would keep the noise and ~4 [B, C] intermediates)."""

    @staticmethod
    def forward(ctx, cos_blk, std, row_key, col_key, scale):  # type: ignore[override]
        ctx.scale = scale
        if not cos_blk.is_cuda and cos_blk.requires_grad:
            # Eager (CPU): each op is a pass over the block, so the angles are computed once,
            # on the perturbed rows only, and the backward's factor kept (one [R, C] tensor, R
            # the perturbed rows) instead of drawing the noise again. Same ops on the same
            # values as cloud_forward / cloud_backward: the same bits.
            out, ratio, rows = _forward_keep_ratio(cos_blk, std, row_key, col_key, scale)
            ctx.save_for_backward(ratio, rows)
            ctx.kept_ratio = True
            return out
        ctx.kept_ratio = False
        ctx.save_for_backward(cos_blk, std, row_key, col_key)
        return call_fused("cloud_forward", cloud_forward, cos_blk, std, row_key, col_key, scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.kept_ratio:
            ratio, rows = ctx.saved_tensors
            grad_in = grad * ctx.scale
            if rows.numel():
                grad_in.index_copy_(0, rows, (grad.index_select(0, rows) * ratio) * ctx.scale)
            return grad_in, None, None, None, None
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
