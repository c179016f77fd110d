"""LEAP's feature cloud on the logits: a random angle added to the angle of every logit of a
perturbed sample, with a memory-lean autograd.

other logits  s * cos(clip(theta_j + alpha_j, 0, pi))    target: see margins.target_cos
alpha_j = std_n * z(row key, column key)                 (z: facetrain/heads/noise.py)

`Cloud` is one step's perturbation (per-sample std and noise keys). `Cloud.block_logits` runs the
whole [B, C_s] block through `_CloudCos`, whose backward recomputes the angles and the noise
instead of keeping them; `Cloud.target_alpha` is each sample's angle at its target column, which
margins.margin_logits combines with the margin. On CUDA both run as compiled kernels
(facetrain/heads/fused.py). Gradient: d/dcos = sin(theta') / sin(theta), 0 where the arccos
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


def _noise_of_perturbed_rows(std, row_key, col_key):
    """std * z as _perturbed_angle forms it, with z drawn only on the rows with std > 0 (often
    a few percent of the batch) and 0 elsewhere, where the cloud's output ignores it. z is a
    function of the hash's two 16-bit halves only (log, sqrt, cos of one of 65,536 values, then
    a product), so a row drawn apart has the same bits as in the whole block."""
    rows = torch.nonzero(std.view(-1) > 0).view(-1)           # a host sync: CPU path only
    z = torch.zeros(row_key.shape[0], col_key.shape[1], dtype=torch.float32,
                    device=row_key.device)
    if rows.numel():
        z.index_copy_(0, rows, _noise.gauss(row_key.index_select(0, rows), col_key))
    return std * z


def _forward_keep_ratio(cos_blk, std, row_key, col_key, scale):
    """cloud_forward's output and cloud_backward's sin(theta') / sin(theta) factor from one
    computation of the perturbed angle."""
    theta = torch.clamp(angle(cos_blk) + _noise_of_perturbed_rows(std, row_key, col_key), 0.0,
                        math.pi)
    out = torch.where(std > 0, torch.cos(theta), cos_blk) * scale
    inside = (cos_blk > -1.0 + EPS) & (cos_blk < 1.0 - EPS)
    sin_out = torch.sin(theta)
    sin_in = torch.sqrt(torch.clamp(1.0 - cos_blk * cos_blk, min=2.0 * EPS))
    ratio = torch.where(inside, sin_out / sin_in, torch.zeros_like(sin_out))
    return out, ratio


class _CloudCos(torch.autograd.Function):
    """LEAP perturbation of a whole logit block. Backward keeps only the input block and the
    small keys (plain autograd would keep the noise and ~4 [B, C] intermediates)."""

    @staticmethod
    def forward(ctx, cos_blk, std, row_key, col_key, scale):  # type: ignore[override]
        ctx.scale = scale
        if not cos_blk.is_cuda and cos_blk.requires_grad:
            # Eager (CPU): each op is a pass over the block, so the angles are computed once
            # and the backward's factor kept (one [B, C] tensor) instead of drawing the noise
            # again. Same ops on the same tensors as cloud_forward / cloud_backward: the same
            # bits.
            out, ratio = _forward_keep_ratio(cos_blk, std, row_key, col_key, scale)
            ctx.save_for_backward(ratio, std)
            ctx.kept_ratio = True
            return out
        ctx.kept_ratio = False
        ctx.save_for_backward(cos_blk, std, row_key, col_key)
        return call_fused("cloud_forward", cloud_forward, cos_blk, std, row_key, col_key, scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.kept_ratio:
            ratio, std = ctx.saved_tensors
            return torch.where(std > 0, grad * ratio, grad) * ctx.scale, None, None, None, None
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
