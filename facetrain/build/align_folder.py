"""Align every face photo of a folder tree to the ArcFace template, keeping the folder layout.

Why a report: a photo with no face, several faces or unreadable bytes is never silently dropped;
each image gets one row (path, status, detail) in OUT_DIR/align_report.csv and the counts are
returned. Resumable: an output that already exists was written whole (temporary name, then
rename), so a rerun keeps it and aligns only the rest.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from facetrain.build.align import align_face
from facetrain.build.folders import IMAGE_EXTS
from facetrain.build.landmarks import DlibDetector, read_landmarks_file
from facetrain.data.images import decode_bgr

REPORT = "align_report.csv"
MULTIPLE = ("largest", "skip")
# Statuses of the report; the first two mean an aligned image is in OUT_DIR.
ALIGNED, KEPT = "aligned", "kept"
NO_FACE, SEVERAL, UNREADABLE, NO_LANDMARKS, BAD_LANDMARKS, MISSING = (
    "no_face", "several_faces_skipped", "unreadable", "no_landmarks", "bad_landmarks",
    "missing_image")


@dataclass
class AlignSummary:
    counts: Dict[str, int]
    several_kept_largest: int
    report: str
    output: str
    problems: List[Tuple[str, str, str]] = field(default_factory=list)   # (path, status, why)

    @property
    def written(self) -> int:
        return self.counts.get(ALIGNED, 0) + self.counts.get(KEPT, 0)


class Aligner:
    """bytes of one photo -> (aligned BGR array, note) or raises AlignFailure(status, why)."""

    def __init__(self, landmarks: Optional[Dict[str, np.ndarray]] = None,
                 detector: Optional[object] = None, multiple: str = "largest",
                 image_size: int = 112) -> None:
        if multiple not in MULTIPLE:
            raise ValueError(f"multiple faces: choose one of {MULTIPLE}; got {multiple!r}")
        self.landmarks, self.multiple, self.image_size = landmarks, multiple, image_size
        self.detector = detector if landmarks is not None or detector is not None \
            else DlibDetector()

    def __call__(self, data: bytes, name: str) -> Tuple[np.ndarray, str]:
        img, why = decode_bgr(data)
        if img is None:
            raise AlignFailure(UNREADABLE, why)
        note = ""
        if self.landmarks is not None:
            if name not in self.landmarks:
                raise AlignFailure(NO_LANDMARKS, "not listed in the landmarks file")
            pts = self.landmarks[name]
        else:
            faces = self.detector.detect(img)
            if not faces:
                raise AlignFailure(NO_FACE, "the detector found no face")
            if len(faces) > 1:
                if self.multiple == "skip":
                    raise AlignFailure(SEVERAL, f"{len(faces)} faces (`multiple='skip'`)")
                note = f"kept the largest of {len(faces)} faces"
            pts = max(faces, key=lambda f: f.area).points
        try:
            return align_face(img, pts, self.image_size), note
        except ValueError as exc:
            raise AlignFailure(BAD_LANDMARKS, str(exc)) from None

    def encoded(self, data: bytes, name: str) -> bytes:
        """The aligned image re-encoded in the input's format (make_pack's transform)."""
        arr, _ = self(data, name)
        return _encode(arr, Path(name).suffix)


class AlignFailure(ValueError):
    def __init__(self, status: str, why: str) -> None:
        super().__init__(f"{status}: {why}")
        self.status, self.why = status, why


def _encode(arr: np.ndarray, suffix: str) -> bytes:
    import cv2

    ext = suffix.lower() if suffix.lower() in IMAGE_EXTS else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise ValueError(f"OpenCV cannot encode a {ext} image")
    return buf.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_images(root: Path) -> List[str]:
    """Image files under `root`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def check_folders(image_dir: Path, out_dir: Path) -> None:
    a, b = image_dir.resolve(), out_dir.resolve()
    if not a.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"output folder {out_dir} and image folder {image_dir} overlap; write "
                         "the aligned images to a separate folder")


def align_folder(image_dir: str | Path, out_dir: str | Path, landmarks_file: Optional[str] = None,
                 multiple: str = "largest", image_size: int = 112, progress: bool = False,
                 aligner: Optional[Callable] = None) -> AlignSummary:
    """Write OUT_DIR/<same relative path> for every alignable image, and the report."""
    root, out = Path(image_dir), Path(out_dir)
    check_folders(root, out)
    landmarks = read_landmarks_file(landmarks_file) if landmarks_file else None
    names = list_images(root)
    if aligner is None:
        aligner = Aligner(landmarks, None, multiple, image_size)
    rows: List[Tuple[str, str, str]] = []
    counts: Counter = Counter()
    several = 0
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, unit="img", desc="align", mininterval=1.0)
    for name in it:
        target = out / name
        if target.is_file():
            status, why = KEPT, "already aligned by an earlier run"
        else:
            try:
                arr, why = aligner(_read(root / name), name)
                _write_atomic(target, _encode(arr, target.suffix))
                status = ALIGNED
                several += bool(why)
            except AlignFailure as exc:
                status, why = exc.status, exc.why
            except OSError as exc:
                status, why = UNREADABLE, f"cannot read it: {exc.strerror or exc}"
        counts[status] += 1
        rows.append((name, status, why))
        if progress:
            it.set_postfix_str(", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                               refresh=False)
    if landmarks is not None:
        listed = set(names)
        for name in sorted(set(landmarks) - listed):
            counts[MISSING] += 1
            rows.append((name, MISSING, "in the landmarks file but not an image of the folder"))
    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT
    tmp = report.with_name(f".{REPORT}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "status", "detail"])
            w.writerows(rows)
        os.replace(tmp, report)
    finally:
        tmp.unlink(missing_ok=True)
    problems = [r for r in rows if r[1] not in (ALIGNED, KEPT)]
    return AlignSummary(dict(counts), several, str(report), str(out), problems)


def summary_lines(tool: str, s: AlignSummary, shown: int = 20) -> Tuple[List[str], str]:
    """(problem lines for stderr, one summary line for stdout)."""
    err = [f"{tool}: {status}: {path}: {why}" for path, status, why in s.problems[:shown]]
    if len(s.problems) > shown:
        err.append(f"{tool}: ... {len(s.problems) - shown} more in {s.report}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
    extra = f" ({s.several_kept_largest} had several faces: largest kept)" \
        if s.several_kept_largest else ""
    return err, f"{tool}: aligned images in {s.output}: {counts}{extra}; report {s.report}"


def _read(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()
