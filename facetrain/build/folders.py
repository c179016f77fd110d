"""Build an InsightFace-layout RecordIO dataset from image folders (how users bring data).

Two input shapes: one sub-folder per identity (`root/<identity>/*.jpg`), or a flat folder whose
file names start with the identity (`0002_c1s1_000451_03.jpg`, Market-1501/DukeMTMC). Labels are
contiguous in sorted identity order; `labels.csv` beside the output maps label -> identity.
Image bytes are copied unchanged unless a size is given (then decoded, resized, re-encoded).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from facetrain.build.output import removed_if_failed, write_text_tmp
from facetrain.build.writer import write_insightface_dataset
from facetrain.data.images import decode_bgr

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
FLAT_ID = re.compile(r"^(-?\d+)_")   # Market-1501 / DukeMTMC-reID: PPPP_cCsS_FFFFFF_NN.jpg


def _images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def scan_identity_folders(root: Path) -> List[Tuple[str, List[Path]]]:
    """[(identity name, image files)] for `root/<identity>/*`, identities sorted by name."""
    out = [(d.name, _images(d)) for d in sorted(root.iterdir()) if d.is_dir()]
    return [(name, files) for name, files in out if files]


def scan_flat_folder(root: Path) -> Tuple[List[Tuple[str, List[Path]]], int]:
    """Group a flat folder by the leading integer id; ids < 0 (Market's junk) are left out.

    Returns (groups sorted by numeric id, number of files left out).
    """
    groups: dict = {}
    dropped = 0
    for f in _images(root):
        m = FLAT_ID.match(f.name)
        if m is None:
            raise ValueError(f"{f}: file name does not start with `<integer id>_` (Market-1501 "
                             "style); use one sub-folder per identity instead")
        pid = int(m.group(1))
        if pid < 0:
            dropped += 1
            continue
        groups.setdefault(pid, []).append(f)
    return [(str(pid), groups[pid]) for pid in sorted(groups)], dropped


def detect_layout(root: Path) -> str:
    if any(d.is_dir() for d in root.iterdir()):
        return "folders"
    return "flat"


@dataclass
class FoldersSummary:
    layout: str
    classes: int
    images: int
    dropped: int
    image_shape: Tuple[int, int]
    output: str
    skipped: List[str] = field(default_factory=list)


class BadImageError(ValueError):
    """An input image that cannot be decoded; the message names it and the way to skip it."""


def _bad_message(path: Path, why: str, others: int) -> str:
    more = f" (and {others} more bad file(s))" if others else ""
    return (f"{path}: {why}{more}; remove or replace it, or pass `skip_bad=True` to "
            "leave undecodable files out (each is listed)")


def _check_files(groups: List[Tuple[str, List[Path]]], progress: bool
                 ) -> Tuple[List[Tuple[str, List[Path]]], List[Tuple[Path, str]]]:
    """Decode every file once; return (groups with only good files, [(bad file, why)])."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(f) for _, f in groups), unit="img", desc="check",
                   mininterval=1.0, leave=False)
    bad: List[Tuple[Path, str]] = []
    good_groups = []
    try:
        for name, files in groups:
            good = []
            for f in files:
                arr, why = decode_bgr(f.read_bytes())
                if arr is None:
                    bad.append((f, why))
                else:
                    good.append(f)
                if bar is not None:
                    bar.update(1)
            good_groups.append((name, good))
    finally:
        if bar is not None:
            bar.close()
    return good_groups, bad


def _encode(path: Path, size: Optional[Tuple[int, int]]) -> Tuple[bytes, tuple]:
    import cv2

    data = path.read_bytes()
    if size is None:
        return data, ()
    arr, why = decode_bgr(data)
    if arr is None:
        raise BadImageError(_bad_message(path, why, 0))
    if arr.shape[:2] != size:
        arr = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return enc.tobytes(), size


def folders_to_rec(root: str, out_prefix: str, layout: str = "auto",
                   size: Optional[Sequence[int]] = None, shard_size: Optional[int] = None,
                   check: bool = True, progress: bool = False,
                   skip_bad: bool = False) -> FoldersSummary:
    """Write `out_prefix.rec/.idx` (or shards), `property` and `labels.csv`; return a summary.

    With `check` every file is decoded before anything is written: a bad one stops the run
    with its name (or, with `skip_bad`, is left out and listed in the summary; an identity left
    with no image is dropped). Without `check` files are copied as they are; `skip_bad` implies
    `check`.
    """
    check = check or skip_bad
    rootp = Path(root)
    if not rootp.is_dir():
        raise FileNotFoundError(f"image folder {rootp} does not exist")
    layout = detect_layout(rootp) if layout == "auto" else layout
    if layout == "folders":
        groups, dropped = scan_identity_folders(rootp), 0
    elif layout == "flat":
        groups, dropped = scan_flat_folder(rootp)
    else:
        raise ValueError(f"layout must be auto, folders or flat; got {layout!r}")
    if not groups:
        raise ValueError(f"{rootp}: no images found ({', '.join(IMAGE_EXTS)})")
    skipped: List[str] = []
    if check:
        groups, bad = _check_files(groups, progress)
        if bad and not skip_bad:
            raise BadImageError(_bad_message(bad[0][0], bad[0][1], len(bad) - 1))
        skipped = [f"{f}: {why}" for f, why in bad]
        groups = [(name, files) for name, files in groups if files]
        if not groups:
            raise BadImageError(f"{rootp}: none of the images can be decoded (first: "
                                f"{skipped[0]}); nothing to write")
    want = tuple(size) if size else None
    if want is not None and len(want) == 1:
        want = (want[0], want[0])
    total = sum(len(f) for _, f in groups)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="pack", mininterval=1.0)

    def items() -> Iterator[Tuple[int, bytes]]:
        for label, (_, files) in enumerate(groups):
            for f in files:
                data, _ = _encode(f, want)
                if bar is not None:
                    bar.update(1)
                yield label, data

    first_shape = want or _first_shape(groups[0][1][0])
    out = Path(out_prefix)
    labels_csv = out.parent / "labels.csv"
    rows = [["label", "identity", "images"]]
    rows += [[label, name, len(files)] for label, (name, files) in enumerate(groups)]
    with removed_if_failed(out.parent):
        tmp = write_text_tmp(labels_csv, rows)
        try:
            write_insightface_dataset(out_prefix, items(), len(groups), first_shape,
                                      shard_size=shard_size)
            os.replace(tmp, labels_csv)
        finally:
            tmp.unlink(missing_ok=True)
            if bar is not None:
                bar.close()
    return FoldersSummary(layout, len(groups), total, dropped, first_shape, str(out), skipped)


def _first_shape(path: Path) -> Tuple[int, int]:
    arr, why = decode_bgr(path.read_bytes())
    if arr is None:
        raise BadImageError(_bad_message(path, why, 0))
    return int(arr.shape[0]), int(arr.shape[1])
