"""Which files make up a dataset (one .rec/.idx pair or numbered shards) and whether each .idx
still matches its .rec; rebuilding the ones that do not."""
from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from facetrain.data import recordio as rio

log = logging.getLogger(__name__)
PROPERTY = "property"


class DatasetError(ValueError):
    """A dataset that breaks the format; the message names the file and the key or offset."""


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


def check_index(shard: ShardFiles) -> Tuple[np.ndarray, np.ndarray]:
    """Read a shard's .idx and check it matches the .rec (else say how to rebuild it)."""
    if not shard.rec.is_file():
        raise FileNotFoundError(f"record file {shard.rec} does not exist")
    fix = (f"rebuild it with `python data_tools/rebuild_index.py {shard.rec}` or set "
           "data.rebuild_index=true")
    if not shard.idx.is_file():
        raise FileNotFoundError(f"index file {shard.idx} is missing; {fix}")
    keys, offsets = rio.read_index(shard.idx)
    size = shard.rec.stat().st_size
    if keys.size == 0:
        if size:
            raise DatasetError(f"index file {shard.idx} is empty but {shard.rec} holds {size} "
                               f"bytes (stale index); {fix}")
        return keys, offsets
    last = int(offsets.argmax())
    if offsets[last] >= size or offsets.min() < 0:
        raise DatasetError(f"index file {shard.idx} is stale: offset {int(offsets[last])} (key "
                           f"{int(keys[last])}) is past the end of {shard.rec} ({size} bytes); "
                           f"{fix}")
    fd = os.open(shard.rec, os.O_RDONLY)
    try:
        _, end = rio.read_record_at(fd, int(offsets[last]), shard.rec, int(keys[last]))
    finally:
        os.close(fd)
    if end != size:
        raise DatasetError(f"index file {shard.idx} is stale: its last record ends at byte {end} "
                           f"but {shard.rec} has {size} bytes; {fix}")
    return keys, offsets


def rebuild_indexes(path: Union[str, Path], force: bool = False) -> List[Path]:
    """Rebuild every missing or stale .idx of a dataset (keys numbered across shards)."""
    rebuilt = []
    next_key = 0
    for shard in resolve_shards(path):
        ok = False
        if not force:
            try:
                keys, _ = check_index(shard)
                ok = True
                next_key = int(keys.max()) + 1 if keys.size else next_key
            except (FileNotFoundError, rio.RecordIOError):
                ok = False
        if not ok:
            log.warning("rebuilding %s from %s", shard.idx, shard.rec)
            next_key += rio.rebuild_index(shard.rec, shard.idx, start_key=next_key)
            rebuilt.append(shard.idx)
    return rebuilt


