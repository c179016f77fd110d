"""Write LFW-style verification packs (`.bin`) from an image folder and a pairs file.

The pack is what InsightFace's own loader reads: a pickle of `(bins, issame_list)`, bins = 2N
encoded images (pair i at 2i and 2i+1, in the pairs file's order, so the 10 folds that
evaluators cut in pair order are the file's folds) and N Python bools. Pickle protocol 4 holds
only bytes, bools, a list and a tuple (no class reference), so a restricted unpickler reads it.

Pairs files:
- LFW `pairs.txt`: an optional header (`folds pairs_per_class` or one count), then
  `name n1 n2` (same person: name/name_000n1.jpg, name/name_000n2.jpg) or `name1 n1 name2 n2`.
- CSV `path1,path2,same`: paths relative to the image folder, same in 1/0/true/false/yes/no;
  an optional header row `path1,path2,same`.
"""
from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from facetrain.data import recordio as rio
from facetrain.data.images import decode_bgr

PICKLE_PROTOCOL = 4
_TRUE, _FALSE = {"1", "true", "yes", "same"}, {"0", "false", "no", "different"}


class PairsError(ValueError):
    """A pairs file or image a pack cannot be built from; the message names file and line."""


class Pair(NamedTuple):
    path1: str      # relative to the image folder
    path2: str
    same: bool
    line: int       # 1-based line in the pairs file


def _lfw_name(name: str, num: str, where: str, ext: str) -> str:
    try:
        n = int(num)
    except ValueError:
        raise PairsError(f"{where}: image number {num!r} is not an integer") from None
    return f"{name}/{name}_{n:04d}.{ext}"


def read_lfw_pairs(path: Path, ext: str = "jpg") -> Tuple[List[Pair], Optional[int]]:
    """LFW `pairs.txt` -> (pairs in file order, pair count the header announces or None)."""
    pairs: List[Pair] = []
    expected = None
    with open(path, encoding="utf-8") as fh:
        for no, raw in enumerate(fh, start=1):
            f = raw.split()
            where = f"{path}, line {no}"
            if not f:
                continue
            if not pairs and expected is None and len(f) in (1, 2) and \
                    all(x.isdigit() for x in f):
                # `10 300`: 10 sets of 300 same + 300 different; `1100`: 1100 of each.
                expected = 2 * int(f[0]) * (int(f[1]) if len(f) == 2 else 1)
                continue
            if len(f) == 3:
                pairs.append(Pair(_lfw_name(f[0], f[1], where, ext),
                                  _lfw_name(f[0], f[2], where, ext), True, no))
            elif len(f) == 4:
                pairs.append(Pair(_lfw_name(f[0], f[1], where, ext),
                                  _lfw_name(f[2], f[3], where, ext), False, no))
            else:
                raise PairsError(f"{where}: expected `name n1 n2` (same person) or "
                                 f"`name1 n1 name2 n2` (different people); got {len(f)} fields "
                                 f"{raw.strip()!r}")
    return pairs, expected


def read_csv_pairs(path: Path) -> List[Pair]:
    """CSV `path1,path2,same` -> pairs in file order."""
    pairs: List[Pair] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        for row in reader:
            no = reader.line_num
            where = f"{path}, line {no}"
            if not row or all(not c.strip() for c in row):
                continue
            cells = [c.strip() for c in row]
            if no == 1 and cells == ["path1", "path2", "same"]:
                continue
            if len(cells) != 3 or not cells[0] or not cells[1]:
                raise PairsError(f"{where}: expected `path1,path2,same`; got {','.join(row)!r}")
            flag = cells[2].lower()
            if flag not in _TRUE | _FALSE:
                raise PairsError(f"{where}: same must be 1/0, true/false or yes/no; got "
                                 f"{cells[2]!r}")
            pairs.append(Pair(cells[0], cells[1], flag in _TRUE, no))
    return pairs


def read_pairs(path: str | Path, fmt: str = "auto", ext: str = "jpg"
               ) -> Tuple[List[Pair], Optional[int]]:
    """(pairs, announced count or None); fmt auto = csv for a .csv file, else LFW."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "lfw"
    if fmt == "csv":
        return read_csv_pairs(path), None
    if fmt == "lfw":
        return read_lfw_pairs(path, ext)
    raise ValueError(f"pairs format must be auto, lfw or csv; got {fmt!r}")


def check_folds(pairs: List[Pair], n_folds: int, source: Path,
                expected: Optional[int] = None) -> None:
    """Refuse a pair count the header contradicts, or one the folds cannot split evenly, or a
    fold without same or without different pairs (its accuracy would mean nothing)."""
    n = len(pairs)
    if expected is not None and expected != n:
        raise PairsError(f"{source}: the header announces {expected} pairs but the file has {n}")
    if n == 0:
        raise PairsError(f"{source}: no pairs")
    if n_folds < 1 or n % n_folds:
        raise PairsError(f"{source}: {n} pairs do not split into {n_folds} equal folds "
                         f"({n} is not a multiple of {n_folds}); the evaluator cuts folds in "
                         "pair order, so add or remove pairs (or pass another `n_folds`)")
    size = n // n_folds
    for k in range(n_folds):
        fold = pairs[k * size:(k + 1) * size]
        same = sum(p.same for p in fold)
        if same in (0, size):
            kind = "different" if same == 0 else "same"
            raise PairsError(f"{source}: fold {k + 1} of {n_folds} (lines {fold[0].line}-"
                             f"{fold[-1].line}) holds only {kind} pairs; order the file so every "
                             "fold mixes same and different pairs (LFW: 300 same then 300 "
                             "different per fold)")


@dataclass
class PackSummary:
    pairs: int
    same: int
    images: int          # distinct image files
    image_shape: Tuple[int, int]
    output: str


def _load_images(pairs: List[Pair], root: Path, source: Path,
                 transform: Optional[Callable[[bytes, str], bytes]], progress: bool
                 ) -> Tuple[Dict[str, bytes], Tuple[int, int]]:
    """Every named image read once (and transformed), checked to decode, all of one size."""
    missing = [(p.line, q) for p in pairs for q in (p.path1, p.path2)
               if not (root / q).is_file()]
    if missing:
        shown = "; ".join(f"line {no}: {root / q}" for no, q in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PairsError(f"{source}: {len(missing)} pair image(s) do not exist ({shown}{more})")
    first_line: Dict[str, int] = {}
    for p in pairs:
        first_line.setdefault(p.path1, p.line)
        first_line.setdefault(p.path2, p.line)
    names = list(first_line)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, unit="img", desc="read", mininterval=1.0)
    data: Dict[str, bytes] = {}
    shape = None
    for q in names:
        raw = (root / q).read_bytes()
        if transform is not None:
            try:
                raw = transform(raw, q)
            except ValueError as exc:     # e.g. no face found: name the image and its pair
                raise PairsError(f"{root / q} (pairs file line {first_line[q]}): cannot align "
                                 f"it: {exc}") from None
        arr, why = decode_bgr(raw)
        if arr is None:
            raise PairsError(f"{root / q} (pairs file line {first_line[q]}): {why}")
        if shape is None:
            shape, shape_of = arr.shape[:2], q
        elif arr.shape[:2] != shape:
            raise PairsError(f"{root / q} is {arr.shape[0]}x{arr.shape[1]} but {root / shape_of} "
                             f"is {shape[0]}x{shape[1]}; a pack holds images of one size (align "
                             "or resize them first, e.g. facetrain.build.align_folder.align_folder)")
        data[q] = raw
    return data, tuple(shape)


def write_pack(output: Path, bins: List[bytes], issame: List[bool]) -> None:
    """Pickle (bins, issame) under a temporary name beside `output`, then rename."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        with rio.writing_to(output, tmp):
            with open(tmp, "wb") as fh:
                pickle.dump((bins, issame), fh, protocol=PICKLE_PROTOCOL)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def make_pack(image_dir: str | Path, pairs_file: str | Path, output: str | Path,
              fmt: str = "auto", n_folds: int = 10, ext: str = "jpg", overwrite: bool = False,
              transform: Optional[Callable[[bytes, str], bytes]] = None,
              progress: bool = False) -> PackSummary:
    """Build `output` (.bin) from the images under `image_dir` named by `pairs_file`.
    `transform(bytes, relative path) -> bytes` (e.g. alignment) is applied to each image once."""
    root, source, out = Path(image_dir), Path(pairs_file), Path(output)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass `overwrite=True` to replace it")
    if out.resolve() == source.resolve():
        raise ValueError(f"output {out} is the pairs file; choose another name")
    pairs, expected = read_pairs(source, fmt, ext)
    check_folds(pairs, n_folds, source, expected)
    data, shape = _load_images(pairs, root, source, transform, progress)
    bins = [data[q] for p in pairs for q in (p.path1, p.path2)]
    issame = [bool(p.same) for p in pairs]
    write_pack(out, bins, issame)
    return PackSummary(len(pairs), sum(issame), len(data), shape, str(out))
