"""Class-balanced loss weights from the effective number of samples (Cui et al., CVPR 2019).

A class with K samples is worth E(K) = (1 - beta^K) / (1 - beta) "effective" samples, because
near-duplicates add less and less. Its loss weight is proportional to 1 / E(K):

    w_c = (1 - beta) / (1 - beta^K_c),  rescaled so that the mean of w_c over classes is 1.

Cui et al. rescale so that sum_c w_c = C, which is the same thing. beta = 0 gives w_c = 1 for
every class (off); beta -> 1 approaches inverse class frequency. The weight depends only on the
label, so in the softmax split by class blocks it is a per-sample scale of the loss that every rank can
compute for the whole gathered batch (docs/long_tail_remedies.md).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def effective_number_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """Per-class weights float64 [C], mean 1 over classes. Classes with 0 images (possible in
    a label space with gaps) get weight 0 in the formula's limit sense: they have no samples to
    weight, and they are left out of the normalisation so the others still average to 1."""
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balance beta must be in [0, 1); got {beta!r}")
    present = counts > 0
    weights = np.zeros_like(counts)
    if beta == 0.0:
        weights[present] = 1.0
        return weights
    # 1 - beta^K computed as -expm1(K log beta): accurate when beta is close to 1.
    weights[present] = (1.0 - beta) / -np.expm1(counts[present] * np.log(beta))
    if present.any():
        weights[present] /= weights[present].mean()
    return weights


def class_weight_table(class_counts: np.ndarray, beta: float,
                       device: torch.device) -> Optional[torch.Tensor]:
    """float32 [C] weights on `device` for label lookup, or None when beta = 0 (off): the
    unweighted loss then runs exactly as before."""
    if beta == 0.0:
        return None
    return torch.as_tensor(effective_number_weights(class_counts, beta), dtype=torch.float32,
                           device=device)
