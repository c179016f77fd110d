"""Which files make up a dataset (one .rec/.idx pair or numbered shards) and whether each .idx
still matches its .rec; rebuilding the ones that do not."""
from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from facetrain.data import recordio as rio
from facetrain.data.errors import DatasetError, StaleIndexError
from facetrain.data.framing import check_framing

log = logging.getLogger(__name__)
PROPERTY = "property"


@dataclass(frozen=True)
class ShardFiles:
    rec: Path
    idx: Path


def resolve_shards(path: Union[str, Path]) -> List[ShardFiles]:
    """Turn a prefix, a .rec path or a folder into the ordered list of shard files."""
    p = Path(path)
    tried: List[str] = []
    if p.suffix == ".rec":
        cands = [p]
        tried.append(str(p))
    elif p.is_dir():
        single = p / "train.rec"
        shards = _shard_glob(p / "train")
        tried += [str(single), str(p / "train_000.rec")]
        if not single.is_file() and not shards:
            others = sorted(p.glob("*.rec"))
            stems = {re.sub(r"_\d+$", "", o.stem) for o in others}
            if len(stems) == 1:
                stem = stems.pop()
                single, shards = p / f"{stem}.rec", _shard_glob(p / stem)
        cands = [single] if single.is_file() else shards
    else:
        cands = [p.with_name(p.name + ".rec")] if p.with_name(p.name + ".rec").is_file() \
            else _shard_glob(p)
        tried += [f"{p}.rec", f"{p}_000.rec"]
    cands = [c for c in cands if c.is_file()]
    if not cands:
        raise FileNotFoundError(f"no RecordIO data at {path}: looked for {', '.join(tried)}; "
                                "pass a prefix (data/x/train), a .rec file or a folder holding "
                                "train.rec or train_000.rec, train_001.rec, ...")
    return [ShardFiles(c, c.with_suffix(".idx")) for c in cands]


def _shard_glob(prefix: Path) -> List[Path]:
    found = glob.glob(glob.escape(str(prefix)) + "_[0-9]*.rec")
    found = [Path(f) for f in found if re.fullmatch(r"_\d+", Path(f).stem[len(prefix.name):])]
    return sorted(found, key=lambda f: int(f.stem[len(prefix.name) + 1:]))


def read_property(folder: Path) -> Optional[Tuple[int, Tuple[int, int]]]:
    """`property` file beside the data: `num_classes,h,w` -> (num_classes, (h, w)) or None."""
    prop = folder / PROPERTY
    if not prop.is_file():
        return None
    parts = prop.read_text().strip().split(",")
    try:
        n, h, w = (int(x) for x in parts)
    except ValueError:
        raise DatasetError(f"{prop}: expected `num_classes,height,width` (three integers); got "
                           f"{prop.read_text().strip()!r}") from None
    return n, (h, w)


def check_index(shard: ShardFiles, progress: Optional[Callable[[int], None]] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Read a shard's .idx and check its framing at every offset (else say how to rebuild it).

    Raises FileNotFoundError (missing .idx), StaleIndexError or rio.RecordIOError (the .idx does
    not match; rebuilding fixes it) or rio.TruncatedRecordError (the .rec is cut short; only a
    new copy fixes it). `progress(n)` is called as entries are checked.
    """
    if not shard.rec.is_file():
        raise FileNotFoundError(f"record file {shard.rec} does not exist")
    if not shard.idx.is_file():
        raise rio.missing_index_error(shard.rec, shard.idx)
    keys, offsets = rio.read_index(shard.idx)
    check_framing(shard.rec, shard.idx, keys, offsets, progress)
    return keys, offsets


def rebuild_indexes(path: Union[str, Path], force: bool = False,
                    progress: Optional[Callable[[int], None]] = None) -> List[Path]:
    """Rebuild every missing or stale .idx of a dataset (keys numbered across shards).

    Every index is checked at every offset first (unless `force`). A truncated .rec is not an
    index problem: its error is raised as is, since a rebuilt index would hide lost records.
    `progress(n)` is called with the bytes of .rec scanned.
    """
    rebuilt = []
    next_key = 0
    for shard in resolve_shards(path):
        ok = False
        if not force:
            try:
                keys, _ = check_index(shard)
                ok = True
                next_key = int(keys.max()) + 1 if keys.size else next_key
            except rio.TruncatedRecordError:
                raise
            except (FileNotFoundError, StaleIndexError, rio.RecordIOError) as exc:
                reason = str(exc).split("; rebuild it")[0]
        if not ok:
            if force:
                log.info("rebuilding %s from %s", shard.idx, shard.rec)
            else:
                log.warning("rebuilding %s from %s (%s)", shard.idx, shard.rec, reason)
            next_key += rio.rebuild_index(shard.rec, shard.idx, start_key=next_key,
                                          progress=progress)
            rebuilt.append(shard.idx)
    return rebuilt
