"""Sub-center ArcFace (Deng et al., ECCV 2020): K weight vectors per class, the class's cosine is
the best of them, then ArcFace's margin (m = head.margin.m_arc, K = head.margin.subcenters).

  cos(theta_j) = max_k cos(f, W_{j,k});  target s cos(clip(theta_y + alpha_y + m, 0, pi))

The max is taken where the cosines are made (PartialFC.block_logits: with K > 1 the weight is
[C_local, K, D] and the [N, C_s * K] cosines are reduced to [N, C_s] before anything else), so
LEAP, sampling and the softmax see one cosine per class and the margin is ArcFace's. Because
the class is dim 0 of the weight, all K sub-centres of a class live in one rank's class block, class sampling
keeps or drops a class whole, and checkpoints and optimizer state reshard by class unchanged.
The gradient of the max goes to the best sub-centre only.

The paper's cleaning step after training (drop the non-dominant sub-centres and the samples far
from the dominant one, then retrain ArcFace on the cleaned data) is `dominant_subcenters`: given
the trained weight and the training set's features it returns each class's dominant sub-centre,
the K = 1 classifier of those rows and which samples to keep; `dominant_block_state` turns a
saved subcenter block into an ArcFace block of those rows. Extracting the features (a pass of
the backbone over the training set) is the caller's.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple

import torch
import torch.nn.functional as F

from facetrain.config import MarginConfig
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind


@register("subcenter")
class SubCenterArcFace(MarginKind):
    """ArcFace on the best sub-centre's cosine (the max lives in PartialFC.block_logits)."""

    def __init__(self, cfg: MarginConfig, device: torch.device | None = None):
        super().__init__(cfg, device)
        self.m_cos, self.m_arc = 0.0, cfg.m_arc
        self.subcenters = cfg.subcenters

    def class_cosines(self, cos: torch.Tensor) -> torch.Tensor:
        """[N, C_s * K] cosines to every sub-centre (class-major) -> [N, C_s], the best of each
        class's K (its gradient goes to that one)."""
        return cos.view(cos.shape[0], -1, self.subcenters).max(dim=2).values


class DominantSubcenters(NamedTuple):
    """index [C] int64: each class's dominant sub-centre; weight [C, D]: those rows (the K = 1
    classifier); keep [N] bool: the sample is within max_angle of its class's dominant
    sub-centre; nearest [C, K] int64: how many of the class's samples are nearest each one."""

    index: torch.Tensor
    weight: torch.Tensor
    keep: torch.Tensor
    nearest: torch.Tensor


def dominant_subcenters(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                        max_angle_deg: float = 75.0, chunk: int = 65536) -> DominantSubcenters:
    """Sub-center ArcFace's cleaning step (Deng et al., ECCV 2020).

    weight [C, K, D] the trained sub-centres; features [N, D] the training set's embeddings (any
    norm); labels [N] int64 in [0, C). A sample's sub-centre is the nearest of its class's K; a
    class's dominant sub-centre is the one most of its samples pick (ties and classes with no
    sample: the lowest index); a sample is kept when its angle to that dominant sub-centre is at
    most max_angle_deg (the paper's 75 degrees). Works in chunks of `chunk` samples."""
    if weight.dim() != 3:
        raise ValueError(f"dominant_subcenters: weight must be [C, K, D]; got {tuple(weight.shape)}")
    c, k, d = weight.shape
    if features.dim() != 2 or features.shape[1] != d or labels.shape != features.shape[:1]:
        raise ValueError(f"dominant_subcenters: features must be [N, {d}] with labels [N]; got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"dominant_subcenters: labels must be in [0, {c}); got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    w = F.normalize(weight.detach().float(), dim=2)
    nearest = torch.zeros(c, k, dtype=torch.int64, device=weight.device)
    for lo in range(0, labels.numel(), chunk):
        f = F.normalize(features[lo:lo + chunk].detach().float().to(w.device), dim=1)
        y = labels[lo:lo + chunk].to(w.device)
        best = torch.einsum("nd,nkd->nk", f, w[y]).argmax(dim=1)
        nearest.view(-1).index_add_(0, y * k + best, torch.ones_like(best))
    # argmax returns the first maximum: ties (and empty classes) go to the lowest index.
    index = nearest.argmax(dim=1)
    dominant = w[torch.arange(c, device=w.device), index]
    min_cos = math.cos(math.radians(max_angle_deg))
    keep = torch.empty(labels.numel(), dtype=torch.bool, device=w.device)
    for lo in range(0, labels.numel(), chunk):
        f = F.normalize(features[lo:lo + chunk].detach().float().to(w.device), dim=1)
        y = labels[lo:lo + chunk].to(w.device)
        keep[lo:lo + chunk] = (f * dominant[y]).sum(dim=1) >= min_cos
    rows = weight.detach()[torch.arange(c, device=weight.device), index.to(weight.device)]
    return DominantSubcenters(index, rows.clone(), keep, nearest)


def dominant_block_state(state: Dict, index: torch.Tensor) -> Dict:
    """A saved PartialFC class block of kind subcenter (its `state_dict()`) -> the same block as
    an ArcFace (K = 1) block holding each class's dominant row; index [C] is
    `dominant_subcenters(...).index` over all classes. Load it into a head of
    head.margin.kind=arcface (and subcenters 1) to retrain on the cleaned data."""
    weight = state["weight"]
    if weight.dim() != 3:
        raise ValueError(f"dominant_block_state: the block's weight is {tuple(weight.shape)}, "
                         "not [C_local, K, D]: it is not a sub-center ArcFace block")
    lo, hi = state["class_start"], state["class_end"]
    if index.shape != (state["num_classes"],):
        raise ValueError(f"dominant_block_state: index must be [{state['num_classes']}] (every "
                         f"class); got {tuple(index.shape)}")
    local = index[lo:hi].to(weight.device)
    rows = weight[torch.arange(hi - lo, device=weight.device), local].clone()
    return {**state, "weight": rows, "margin_kind": "arcface", "margin": {}}
