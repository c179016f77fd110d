"""Cosine-logit margins (CosFace, ArcFace, combined), with room for LEAP's angle on the target.

Target logit  s * (cos(clip(theta_y + alpha_y + m_arc, 0, pi)) - m_cos)
other logits  s * cos(clip(theta_j + alpha_j, 0, pi))          (alpha = 0 without LEAP)

Gradient treatment (unlike InsightFace's margin, which runs under no_grad and so passes the
gradient straight through as if the margin were the identity): we back-propagate the exact
derivative of the formula above, d/dcos = sin(theta') / sin(theta). `cos` is clamped to
[-1 + EPS, 1 - EPS] before arccos, which bounds that ratio by 1/sqrt(2 EPS) and makes it 0 at
exactly +-1; clipping the angle to [0, pi] gives sin(theta') = 0, i.e. no gradient, at the ends.
Entries that carry neither margin nor perturbation keep `cos` itself (exact, gradient 1).

Every margin kind (facetrain/heads/kinds/, chosen by `head.margin.kind`) runs through the one
path of `margin_logits`: cosines -> LEAP's angle on every logit (Eq. 7/8) -> the kind's global
per-step quantities (`MarginKind.prepare`) -> the kind's change to the other logits
(`MarginKind.others`) -> the kind's margin on the perturbed target -> the scale. `MarginKind`
itself is the CosFace/ArcFace/combined margin above; the other kinds subclass it.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

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


class StepInputs(NamedTuple):
    """What a margin kind may read about the step besides the cosines (all global-batch, the
    same on every rank): labels [N] global class ids; norms [N] float32, the embeddings' norms
    before normalisation (None unless the kind sets uses_norms; they carry the gradient to the
    embeddings, so a kind detaches what it must not differentiate); counter, the 0-d draw
    index of this step in the head's counter-based stream (facetrain/heads/noise.py) and
    noise_seed; the class-block group (None = one process); training (running statistics
    move only in training)."""

    labels: torch.Tensor
    norms: Optional[torch.Tensor]
    counter: torch.Tensor
    noise_seed: int
    group: Optional[dist.ProcessGroup]
    training: bool


class MarginKind:
    """A margin on cosine logits; this base class is CosFace / ArcFace / combined.

    Subclasses (one file each in facetrain/heads/kinds/) override some of:
    - `prepare`: per-step quantities, computed identically on every rank (collectives allowed);
    - `others`: a change of the scaled, perturbed block [B, C_s] (targets still margin-free);
    - `target`: the unscaled target logit from the target cosine and its LEAP angle;
    - `state_dict` / `load_state_dict`: running statistics (replicated, world-size free);
    - `set_class_counts` (margins per class) and `extra_loss` (a term beside the CE).
    `own_value_on_other_rows` says whether `target` with loc = 0 reproduces the block's own
    value at that column (then the margin path writes it as is, bit for bit as before); if not,
    margin_logits copies the block's value for rows whose class lives in another rank's block.
    """

    uses_noise = False                  # draws from the head's counter-based stream each step
    uses_norms = False                  # reads StepInputs.norms (else they are None)
    own_value_on_other_rows = True

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.scale = cfg.scale
        self.m_cos, self.m_arc = margin_values(cfg)

    def prepare(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                inputs: Optional[StepInputs]) -> None:
        """Per-step global quantities (none for the classic margins)."""

    def others(self, logits: torch.Tensor) -> torch.Tensor:
        """The scaled block with the kind's change to the non-target logits (none here)."""
        return logits

    def target(self, cos_t: torch.Tensor, alpha_t: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Unscaled target logits [B]; loc [B] is 1.0 where this rank owns the class."""
        return target_cos(cos_t, alpha_t, self.m_cos * loc, self.m_arc * loc)

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """The global class counts K_i [C] int64 (on the head's device), for kinds whose margin
        depends on the class (LDAM); the others ignore them."""

    def extra_loss(self, world_size: int) -> Optional[torch.Tensor]:
        """A term added to the cross-entropy after the step's logits (MagFace's regulariser): a
        replicated value whose gradient the kind scales by 1 / world_size, because every rank
        computes it on the whole gathered batch and the all-gather sums the ranks' gradients.
        None = no term."""
        return None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Running statistics to checkpoint (CPU copies; replicated over ranks)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor], where: str) -> None:
        """Restore `state_dict()`; `where` names the checkpoint for error messages."""
        if state:
            raise ValueError(f"{where}: margin state {sorted(state)} is not one of "
                             f"head.margin.kind={self.cfg.kind!r}")


def margin_logits(cos_blk: torch.Tensor, target_col: torch.Tensor, is_local: torch.Tensor,
                  margin: MarginConfig | MarginKind, cloud: Optional[Perturbation] = None,
                  inputs: Optional[StepInputs] = None) -> torch.Tensor:
    """Scaled logits of one rank's class block, margin on the targets it owns.

    cos_blk [B, C_s] fp32 (split over ranks by class, replicated over the global batch);
    target_col [B] int64: column of each sample's class in this block (any valid column where
    is_local [B] is False); margin: a kind (facetrain/heads/kinds) or a classic MarginConfig;
    cloud: LEAP's per-sample std and noise keys (None = no perturbation); inputs: the step's
    global quantities for kinds that need them. Returns [B, C_s] fp32.
    """
    kind = margin if isinstance(margin, MarginKind) else MarginKind(margin)
    col = target_col.view(-1, 1)
    cos_t = cos_blk.gather(1, col).squeeze(1)
    if cloud is None:
        logits = cos_blk * kind.scale
        alpha_t = torch.zeros_like(cos_t)
    else:
        logits = cloud.block_logits(cos_blk, kind.scale)
        alpha_t = cloud.target_alpha(target_col, cos_blk.shape[1])
    kind.prepare(cos_t, alpha_t, is_local, inputs)
    logits = kind.others(logits)
    # Every row rewrites its target column. A row whose class lives in another rank's block rewrites
    # (column 0) with its own value, margin-free: a no-op that avoids a host sync to select the
    # local rows. The values come from an O(B) side path on cos_blk, so the in-place scatter
    # never touches a tensor autograd saved, and the gradient of the overwritten entries flows
    # through that side path.
    loc = is_local.to(cos_t.dtype)
    val = kind.target(cos_t, alpha_t, loc) * kind.scale
    if not kind.own_value_on_other_rows:
        # Rows of other ranks' classes keep the block's own value; gather saves the block for its
        # backward, so this scatter is out of place (one more [B, C_s] buffer, these kinds only).
        val = torch.where(is_local, val, logits.gather(1, col).squeeze(1))
        return logits.scatter(1, col, val.view(-1, 1))
    return logits.scatter_(1, col, val.view(-1, 1))
