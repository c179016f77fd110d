"""Find the CJK font designs installed on this machine, one file per design.

fontTools reads each face's cmap (collections such as .ttc hold several faces); Pillow renders
(render.py). Two pitfalls measured on Debian's font packages: some faces list characters that draw
nothing (SetoFont-ex), and packages ship the same design several times (proportional/mono twins,
regional or weight variants, fonts derived from another). `select_designs` drops both and says why.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Sequence, Set, Tuple

import cv2
import numpy as np

from glyph_benchmark.render import DesignRenderer

log = logging.getLogger(__name__)

FONT_ROOTS: Tuple[str, ...] = ("/usr/share/fonts",)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
# CJK Unified Ideographs: the characters (classes) of the glyph benchmark.
CJK_FIRST, CJK_LAST = 0x4E00, 0x9FFF
# A face covering fewer ideographs than this is not a CJK font (DejaVu covers none).
MIN_FACE_COVERAGE = 1000
# Debian packages measured useful for the glyph study; `scripts/setup.sh --fonts` installs the
# missing ones.
FONT_PACKAGES: Tuple[str, ...] = (
    "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-vlgothic", "fonts-seto",
    "fonts-aoyagi-kouzan-t", "fonts-aoyagi-soseki", "fonts-kouzan-mouhitsu", "fonts-umeplus",
    "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi", "fonts-sawarabi-gothic",
    "fonts-sawarabi-mincho", "fonts-konatu", "fonts-misaki", "fonts-kiloji", "fonts-wqy-microhei",
    "fonts-wqy-zenhei", "fonts-arphic-uming", "fonts-arphic-bkai00mp", "fonts-arphic-bsmi00lp",
    "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp", "fonts-cwtex-kai", "fonts-cwtex-ming",
    "fonts-cwtex-heib", "fonts-cwtex-yen", "fonts-cwtex-fs", "fonts-smiley-sans",
)
# Probe characters for design comparison: common in Japanese, simplified and traditional sets,
# so every pair of faces shares many of them.
PROBE_CHARS = "永東京國国人大中日月山水火木金土雨電話語學学生先書道風愛龍馬鳥魚花草竹石田力心手口目耳足車門雲"
PROBE_SIZE = 32
# Designs are compared on blurred, mean-removed, unit-norm probe renders (1 - cosine, averaged
# over shared probe chars): the blur makes the distance insensitive to stroke weight, so weight
# twins fall together. Measured at 32 px, sigma 2 on Debian's 28 packages: twins (UMing/Mingti
# 0.005, VL/VL-P 0.006, Kaiti/cwTeX Kai 0.009, kiloji weights 0.013-0.025, Motoya Cedar/Maru
# 0.023) lie below 0.025; the closest distinct designs (IPA Gothic/Motoya Cedar) at 0.033.
BLUR_SIGMA = 2.0
SAME_DESIGN_DISTANCE = 0.03
# A face whose probe renders are mostly blank draws nothing for characters it claims to cover.
MAX_BLANK_PROBE_FRACTION = 0.5


@dataclass(frozen=True)
class FontFace:
    """One face of one font file: `path` (real path), `index` in a collection, its ideographs."""

    path: str
    index: int
    name: str
    coverage: FrozenSet[int] = field(repr=False)   # ideographs with a non-empty outline
    listed: int = 0                                  # ideographs the cmap lists

    @property
    def key(self) -> str:
        return f"{os.path.basename(self.path)}#{self.index}"


@dataclass
class DesignChoice:
    """Faces kept (one per design) and dropped, each dropped face with its reason."""

    kept: List[FontFace]
    dropped: List[Tuple[FontFace, str]]


def find_font_files(roots: Sequence[str] = FONT_ROOTS) -> List[str]:
    """Real paths of font files under `roots`, sorted; symlinked duplicates counted once."""
    found = set()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for name in files:
                if name.lower().endswith(FONT_SUFFIXES):
                    found.add(os.path.realpath(os.path.join(dirpath, name)))
    return sorted(p for p in found if os.path.isfile(p))


def read_faces(path: str) -> List[FontFace]:
    """Every face in a font file with its CJK cmap coverage; unreadable files log and yield []."""
    st = os.stat(path)
    return list(_read_faces_cached(path, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=256)
def _read_faces_cached(path: str, _mtime_ns: int, _size: int) -> Tuple[FontFace, ...]:
    """read_faces memoised per file version: parsing cmaps dominates discovery (~0.1-0.7 s per
    large face) and repeated builds in one process (tests, sweeps) need it once."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    try:
        if path.lower().endswith((".ttc", ".otc")):
            fonts = list(TTCollection(path, lazy=True).fonts)
        else:
            fonts = [TTFont(path, lazy=True)]
    except (TTLibError, OSError, ValueError) as err:
        log.warning("skipping font file %s: fontTools cannot read it (%s)", path, err)
        return ()
    faces = []
    for index, font in enumerate(fonts):
        cmap = font.getBestCmap() or {}
        listed = {c: g for c, g in cmap.items() if CJK_FIRST <= c <= CJK_LAST}
        empty = _empty_glyphs(font, set(listed.values()))
        coverage = frozenset(c for c, g in listed.items() if g not in empty)
        name = (font["name"].getDebugName(4) if "name" in font else None) or os.path.basename(path)
        if len(coverage) < len(listed):
            log.info("%s#%d (%s): %d of %d ideographs in its cmap have empty outlines; not counted",
                     os.path.basename(path), index, name, len(listed) - len(coverage), len(listed))
        faces.append(FontFace(path, index, name, coverage, len(listed)))
    return tuple(faces)


def _empty_glyphs(font, names: Set[str]) -> Set[str]:
    """Glyph names among `names` with no outline data (TrueType: zero-length `loca` entry).

    Brush and handwriting fonts map thousands of characters to such empty glyphs; reading `loca`
    finds them without rendering. CFF fonts return none here; render.is_blank catches those."""
    if "glyf" not in font or "loca" not in font:
        return set()
    loca = font["loca"]
    order = {n: i for i, n in enumerate(font.getGlyphOrder())}
    return {n for n in names if n in order and order[n] + 1 < len(loca)
            and loca[order[n] + 1] == loca[order[n]]}


def discover_faces(roots: Sequence[str] = FONT_ROOTS,
                   min_coverage: int = MIN_FACE_COVERAGE) -> List[FontFace]:
    """CJK faces under `roots`: those whose cmap lists at least `min_coverage` ideographs
    (select_designs drops the ones that draw fewer)."""
    faces = []
    for path in find_font_files(roots):
        for face in read_faces(path):
            if face.listed >= min_coverage:
                faces.append(face)
            else:
                log.debug("not a CJK face: %s (%d ideographs)", face.key, len(face.coverage))
    return faces


def probe_vectors(face: FontFace, size: int = PROBE_SIZE) -> Dict[str, np.ndarray]:
    """Probe char -> blurred, mean-removed, unit-norm render [size*size]; blank renders left out."""
    chars = [c for c in PROBE_CHARS if ord(c) in face.coverage]
    rend = DesignRenderer.create(face.path, face.index, size, chars)
    out = {}
    for ch in chars:
        img = rend.render(ch)
        if img is None:
            continue
        ink = cv2.GaussianBlur((255 - img).astype(np.float32), (0, 0), BLUR_SIGMA).ravel()
        ink -= ink.mean()
        norm = float(np.linalg.norm(ink))
        if norm > 0:
            out[ch] = ink / norm
    return out


def design_distance(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    """1 - mean cosine over shared probe chars (0 = same pixels); inf when nothing is shared."""
    shared = [c for c in a if c in b]
    if not shared:
        return float("inf")
    return 1.0 - float(np.mean([a[c] @ b[c] for c in shared]))


def select_designs(faces: Iterable[FontFace], threshold: float = SAME_DESIGN_DISTANCE,
                   size: int = PROBE_SIZE, min_coverage: int = MIN_FACE_COVERAGE) -> DesignChoice:
    """Keep one face per design, dropping blank faces and near-duplicates (distance < threshold).

    Faces are visited by descending coverage (then path), so of a design's twins the one covering
    the most characters is kept; the result is deterministic for a given set of files."""
    order = sorted(faces, key=lambda f: (-len(f.coverage), f.path, f.index))
    kept: List[FontFace] = []
    kept_vecs: List[Dict[str, np.ndarray]] = []
    dropped: List[Tuple[FontFace, str]] = []
    for face in order:
        if len(face.coverage) < min_coverage:
            dropped.append((face, f"blank: only {len(face.coverage)} of the {face.listed} "
                                  "ideographs its cmap lists have outlines"))
            continue
        vecs = probe_vectors(face, size)
        tried = sum(1 for c in PROBE_CHARS if ord(c) in face.coverage)
        if tried == 0 or 1 - len(vecs) / tried > MAX_BLANK_PROBE_FRACTION:
            dropped.append((face, f"blank: draws nothing for {tried - len(vecs)}/{tried} "
                                  "probe characters its cmap lists"))
            continue
        dists = [design_distance(vecs, kv) for kv in kept_vecs]
        best = int(np.argmin(dists)) if dists else -1
        if best >= 0 and dists[best] < threshold:
            dropped.append((face, f"same design as {kept[best].key} ({kept[best].name}): "
                                  f"distance {dists[best]:.4f} < {threshold}"))
            continue
        kept.append(face)
        kept_vecs.append(vecs)
    kept.sort(key=lambda f: (f.path, f.index))
    return DesignChoice(kept, dropped)


def package_installed(package: str) -> bool:
    """Whether a Debian package is installed (dpkg-query; False where dpkg is absent)."""
    if shutil.which("dpkg-query") is None:
        return False
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                         capture_output=True, text=True, check=False)
    return res.returncode == 0 and res.stdout.strip().endswith("installed") \
        and "not-installed" not in res.stdout


def missing_packages(packages: Sequence[str] = FONT_PACKAGES) -> List[str]:
    """The font packages from `packages` that are not installed, in the given order."""
    return [p for p in packages if not package_installed(p)]
