"""PNG plots (ROC, CMC) with matplotlib's Agg backend, imported only when a plot is written."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")          # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot_roc(curves: Dict[str, Tuple[np.ndarray, np.ndarray]], path: str | Path,
             title: str = "ROC", xmin: float = 1e-6, max_points: int = 20000) -> Path:
    """Log-x ROC curves {label: (fpr, tpr)} -> PNG. Long curves are thinned to `max_points`
    log-spaced FPR points so a 15M-pair ROC plots quickly."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        if fpr.size > max_points:
            grid = np.logspace(np.log10(xmin), 0, max_points)
            idx = np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1)
            fpr, tpr = fpr[idx], tpr[idx]
        ax.plot(np.maximum(fpr, xmin), tpr, label=label)
    ax.set_xscale("log")
    ax.set_xlim(xmin, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, plt, path)


def plot_cmc(curves: Dict[str, Sequence[float]], path: str | Path, title: str = "CMC") -> Path:
    """CMC curves {label: [rate at rank 1, 2, ...]} -> PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, rates in curves.items():
        ax.plot(np.arange(1, len(rates) + 1), rates, marker=".", label=label)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
