"""Up-front checks of evaluation inputs and outputs, so a bad feature file or output path fails
before any work with one message that names the file and says what to do (instead of a NaN
report, plausible numbers from empty features, or a traceback at the very end)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np


def check_features(feats: np.ndarray, where: str, expected_rows: Optional[int] = None,
                   what: str = "the protocol", fix: str = "re-extract the features") -> None:
    """Raise ValueError unless `feats` is a finite 2-D [N, D] array with D > 0 (and N equal to
    `expected_rows`). `where` names the source (file or model) in the message."""
    if feats.ndim != 2:
        raise ValueError(f"{where}: features must be a 2-D array [N, D]; got shape "
                         f"{tuple(feats.shape)}; {fix}")
    if feats.shape[1] == 0:
        raise ValueError(f"{where}: features have shape {tuple(feats.shape)}, zero values per "
                         f"row; {fix}")
    if expected_rows is not None and feats.shape[0] != expected_rows:
        raise ValueError(f"{where}: {feats.shape[0]} feature rows but {what} lists "
                         f"{expected_rows} images; the rows must follow that order one-to-one")
    if not np.issubdtype(feats.dtype, np.number) or np.issubdtype(feats.dtype, np.complexfloating):
        raise ValueError(f"{where}: features must be real numbers; got dtype {feats.dtype}; {fix}")
    if _rows_sum_finite(feats):
        return
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{where}: {rows.size} of {feats.shape[0]} feature rows hold NaN or "
                         f"inf (first: row {int(rows[0])}); {fix}")


def _rows_sum_finite(feats: np.ndarray) -> bool:
    """True when every row sum is finite, which proves every value finite (a NaN or an inf
    makes its row's sum NaN or inf): one pass over IJB-C's 0.96 GB without the N x D boolean
    temporary of isfinite. False sends the caller to the exact check (a sum can also overflow
    from finite values)."""
    if not np.issubdtype(feats.dtype, np.floating):
        return True                                 # integers are always finite
    with np.errstate(over="ignore", invalid="ignore"):     # inf - inf, overflow: exact check
        return bool(np.isfinite(feats.sum(axis=1)).all())


def load_feature_file(path: str | Path) -> np.ndarray:
    """np.load a features .npy with errors that name the file (empty, truncated, not .npy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist"
                                + (" (it is a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise ValueError(f"features file {path} is empty (0 bytes); write it again with "
                         "np.save")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (EOFError, ValueError, OSError) as err:
        raise ValueError(f"features file {path} is not a readable .npy array ({err}); write it "
                         "again with np.save") from None


def check_output_path(path: str | Path, flag: str, suffix: str = ".json") -> Path:
    """Fail before any work when `path` cannot be written as a file: it is a directory, a
    parent is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file path such as "
                         f"{path / ('report' + suffix)}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {parent} is not writable; choose another path")
    return path
