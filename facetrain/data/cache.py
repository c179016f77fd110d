"""Small derived files kept beside the data (label scans, DALI image-only indexes).

Beside the data when its folder is writable (so every job on the node reuses it), else under
`$FACETRAIN_CACHE` or `~/.cache/facetrain/<hash of the data path>/`. A JSON stamp (file sizes and
mtimes) beside each cached array makes a changed dataset invalidate its cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np


def cache_dir_for(rec: Path) -> Path:
    """Where derived files for `rec` live: its own folder if writable, else a user cache."""
    folder = rec.parent
    if os.access(folder, os.W_OK):
        return folder
    root = Path(os.environ.get("FACETRAIN_CACHE", Path.home() / ".cache" / "facetrain"))
    digest = hashlib.sha1(str(rec.resolve()).encode()).hexdigest()[:16]
    out = root / digest
    out.mkdir(parents=True, exist_ok=True)
    return out


def cache_path_for(rec: Path, suffix: str) -> Path:
    """e.g. data/x/train_000.rec + 'labels.npy' -> data/x/train_000.labels.npy."""
    return cache_dir_for(rec) / f"{rec.stem}.{suffix}"


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_cached(path: Path, stamp: Any, mmap: bool = False) -> Optional[np.ndarray]:
    """The cached array if its stamp matches `stamp` (JSON-comparable), else None; with mmap,
    memory-mapped read-only (no heap growth with the dataset)."""
    sp = _stamp_path(path)
    if not (path.is_file() and sp.is_file()):
        return None
    try:
        if json.loads(sp.read_text()) != json.loads(json.dumps(stamp)):
            return None
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError):
        return None


def save_cached(path: Path, stamp: Any, array: np.ndarray) -> None:
    """Write array + stamp atomically; a failure to write only costs a rescan next time."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
        tmp_s = tmp.with_suffix(".json")
        tmp_s.write_text(json.dumps(stamp))
        os.replace(tmp_s, _stamp_path(path))
    except OSError:
        tmp.unlink(missing_ok=True)


def memmap_for_writing(path: Path, n: int, dtype=np.int64) -> Tuple[np.ndarray, Path]:
    """An on-disk array to fill chunk by chunk (memory stays flat); commit with `commit_memmap`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,)), tmp


def commit_memmap(arr: np.ndarray, tmp: Path, path: Path, stamp: Any) -> None:
    arr.flush()
    del arr
    os.replace(tmp, path)
    tmp_s = tmp.with_suffix(".json")
    tmp_s.write_text(json.dumps(stamp))
    os.replace(tmp_s, _stamp_path(path))


def load_cached_mmap(path: Path, stamp: Any) -> Optional[np.ndarray]:
    """`load_cached(path, stamp, mmap=True)`."""
    return load_cached(path, stamp, mmap=True)
