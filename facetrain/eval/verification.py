"""LFW-style verification packs (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A pack is a pickle of ``(bins, issame_list)``: 2N encoded images, pair i at positions 2i and
2i+1, and N booleans. Protocol: flip-sum embeddings, L2-normalised, cosine score per pair;
10 folds in pair order, each fold scored with the threshold that is best on the other 9;
mean/std accuracy plus TPR at FPR 1e-3 over all pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from facetrain.eval.embed import as_bgr_image, l2_normalize
from facetrain.eval.metrics import roc_curve, tpr_at_fpr_from_roc, verification_kfold
from facetrain.eval.pack_pickle import PackRefused, load_pack_pickle


def load_pack(path: str | Path) -> Tuple[List[bytes], np.ndarray]:
    """Read a pack -> (bins[2N] encoded images, issame[N] bool), with its structure checked.

    The pickle is read by `pack_pickle`'s restricted unpickler: a pack from elsewhere runs no
    code (PackRefused, a ValueError, names the file and what it held)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification pack {path} does not exist")
    try:
        bins, issame = load_pack_pickle(path)   # packs written by Python 2 hold bytes
    except PackRefused:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable pickle of (bins, issame_list): "
                         f"{err}") from err
    bins = [bytes(b) if not isinstance(b, np.ndarray) else b.tobytes() for b in bins]
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * issame.size:
        raise ValueError(f"{path}: {len(bins)} images but {issame.size} pairs; a pack needs "
                         "exactly 2 images per pair (pair i = images 2i, 2i+1)")
    return bins, issame


def pair_scores(features: np.ndarray) -> np.ndarray:
    """features[2N, D] in pack order -> cosine score per pair [N] (float64)."""
    f = l2_normalize(features)
    return np.einsum("ij,ij->i", f[0::2], f[1::2], dtype=np.float64)


def evaluate_pack_features(features: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                           fprs: Sequence[float] = (1e-3,)) -> Dict[str, object]:
    """Score one pack from its features[2N, D] (flip-sum already applied)."""
    issame = np.asarray(issame, dtype=bool)
    if features.shape[0] != 2 * issame.size:
        raise ValueError(f"{features.shape[0]} feature rows for {issame.size} pairs; expected "
                         f"{2 * issame.size} rows in pack order")
    scores = pair_scores(features)
    res = verification_kfold(scores, issame, n_folds)
    fpr, tpr, _ = roc_curve(issame, scores)
    res["tpr_at_fpr"] = tpr_at_fpr_from_roc(fpr, tpr, fprs, n_neg=int((~issame).sum()))
    res["pairs"] = int(issame.size)
    res["roc"] = (fpr, tpr)
    return res


class PackImages:
    """Dataset view of a pack's images, decoded with errors that name the pack, image and pair."""

    def __init__(self, bins: List[bytes], path: str | Path) -> None:
        self.bins, self.path = bins, Path(path)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> np.ndarray:
        return as_bgr_image(self.bins[i], f"{self.path}: image {i} (pair {i // 2})")

    def __iter__(self):
        return (self[i] for i in range(len(self)))
