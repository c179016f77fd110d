"""Writers for the held-out glyph evaluation sets, in the public benchmarks' own layouts.

Input: `classes`, a list of (class name, [(design index, image)]) with images uint8 [S, S]
grayscale (dark ink on white). Every writer takes its own seeded numpy Generator so each set is
reproducible on its own. Formats: those of InsightFace (README, "Formats we read"); readers: facetrain/eval/.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from glyph_benchmark.render import to_bgr

ClassImages = Tuple[str, List[Tuple[int, np.ndarray]]]

JPEG_QUALITY = 95
VERIFICATION_FOLDS = 10
# The ArcFace 112x112 5-point template (formats.md); glyph "landmarks" are these points scaled to
# the glyph side, so aligning a loose crop onto the template recovers the centred glyph.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
IJBC_DESIGNS_PER_TEMPLATE = 3      # a template = several designs (faces of one person)
IJBC_MAX_TEMPLATES = 3             # per class
IJBC_MAX_FRAMES = 2                # images per media (one design, several random crops)
LOOSE_CANVAS = 1.75                # loose crop side / glyph side
LOOSE_MAX_ROTATION_DEG = 20.0
LOOSE_SCALE = (0.8, 1.25)
LOOSE_MAX_SHIFT = 0.08             # of the canvas side
ENUMERATE_PAIRS_UP_TO = 4_000_000  # template pairs listed outright below this many


def encode_jpeg(gray: np.ndarray) -> bytes:
    """Grayscale [H, W] -> JPEG bytes of its 3-channel BGR copy (as InsightFace tools write)."""
    ok, buf = cv2.imencode(".jpg", to_bgr(gray), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {gray.shape}")
    return buf.tobytes()


def write_verification_pack(path: Path, classes: Sequence[ClassImages], n_pairs: int,
                            rng: np.random.Generator) -> Dict[str, int]:
    """LFW-style pickle (bins, issame_list): `n_pairs` pairs, 10 contiguous folds, each with its
    own classes (as LFW's folds hold their own people) and same-class pairs first, then
    different-class pairs. Pair i is bins[2i], bins[2i+1]."""
    if n_pairs <= 0 or n_pairs % (2 * VERIFICATION_FOLDS):
        raise ValueError(f"verification pairs must be a positive multiple of "
                         f"{2 * VERIFICATION_FOLDS} (10 folds, half same/half different); "
                         f"got {n_pairs}")
    if len(classes) < 2 * VERIFICATION_FOLDS:
        raise ValueError(f"a verification pack needs at least {2 * VERIFICATION_FOLDS} held-out "
                         f"classes (2 per fold); got {len(classes)}: raise --eval-classes")
    half = n_pairs // (2 * VERIFICATION_FOLDS)
    groups = np.array_split(rng.permutation(len(classes)), VERIFICATION_FOLDS)
    bins: List[bytes] = []
    issame: List[bool] = []
    for group in groups:
        for same in (True, False):
            for a, b in _draw_pairs(classes, group, half, same, rng):
                bins += [encode_jpeg(a), encode_jpeg(b)]
                issame.append(same)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        pickle.dump((bins, issame), fh, protocol=4)
    os.replace(tmp, path)
    return {"pairs": len(issame), "same": int(sum(issame))}


def _draw_pairs(classes: Sequence[ClassImages], group: np.ndarray, count: int, same: bool,
                rng: np.random.Generator) -> List[Tuple[np.ndarray, np.ndarray]]:
    """`count` distinct pairs of images from the classes in `group` (same or different class)."""
    seen = set()
    out = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        if same:
            c = int(rng.choice(group))
            i, j = rng.choice(len(classes[c][1]), 2, replace=False)
            key = (c, min(i, j), c, max(i, j))
            pair = (classes[c][1][i][1], classes[c][1][j][1])
        else:
            c, d = (int(x) for x in rng.choice(group, 2, replace=False))
            i, j = rng.integers(len(classes[c][1])), rng.integers(len(classes[d][1]))
            key = (c, i, d, j) if c < d else (d, j, c, i)
            pair = (classes[c][1][i][1], classes[d][1][j][1])
        if key not in seen:
            seen.add(key)
            out.append(pair)
    if len(out) < count:
        raise ValueError(f"could only draw {len(out)} distinct {'same' if same else 'different'}"
                         f"-class pairs of {count} per fold: lower --verification-pairs or raise "
                         "--eval-classes")
    return out


def loose_crop(gray: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Place a glyph [S, S] in a larger white canvas at a random similarity transform.

    Returns (canvas [C, C] uint8, points [5, 2]): the ArcFace template points scaled to the glyph
    side and mapped through the same transform, so 5-point alignment undoes it."""
    side = gray.shape[0]
    canvas = int(round(side * LOOSE_CANVAS))
    angle = rng.uniform(-LOOSE_MAX_ROTATION_DEG, LOOSE_MAX_ROTATION_DEG)
    scale = rng.uniform(*LOOSE_SCALE)
    shift = rng.uniform(-LOOSE_MAX_SHIFT, LOOSE_MAX_SHIFT, size=2) * canvas
    m = cv2.getRotationMatrix2D((side / 2.0, side / 2.0), angle, scale)
    m[:, 2] += (canvas - side) / 2.0 + shift     # glyph centre -> canvas centre + shift
    img = cv2.warpAffine(gray, m, (canvas, canvas), flags=cv2.INTER_LINEAR, borderValue=255)
    pts = ARCFACE_TEMPLATE_112 * (side / 112.0)
    pts = pts @ m[:, :2].T + m[:, 2]
    return img, pts


def write_ijbc(root: Path, classes: Sequence[ClassImages], impostor_pairs: int,
               rng: np.random.Generator) -> Dict[str, int]:
    """IJB-C 1:1 layout: loose_crop/<n>.jpg and meta/ijbc_{face_tid_mid,template_pair_label,
    name_5pts_score}.txt. A template is IJBC_DESIGNS_PER_TEMPLATE designs of one class, each
    design one media of 1..IJBC_MAX_FRAMES random loose crops; genuine pairs are all template
    pairs of a class, impostor pairs distinct random template pairs across classes."""
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    tid_mid, points = [], []
    template_class: List[int] = []
    n_img = mid = 0
    for c, (_name, images) in enumerate(classes):
        order = rng.permutation(len(images))
        n_templates = min(IJBC_MAX_TEMPLATES, len(images) // IJBC_DESIGNS_PER_TEMPLATE)
        for t in range(n_templates):
            template_class.append(c)
            tid = len(template_class)
            for k in order[t * IJBC_DESIGNS_PER_TEMPLATE:(t + 1) * IJBC_DESIGNS_PER_TEMPLATE]:
                mid += 1
                for _ in range(int(rng.integers(1, IJBC_MAX_FRAMES + 1))):
                    n_img += 1
                    img, pts = loose_crop(images[k][1], rng)
                    name = f"{n_img}.jpg"
                    (crops / name).write_bytes(encode_jpeg(img))
                    tid_mid.append(f"{name} {tid} {mid}\n")
                    score = rng.uniform(0.9, 1.0)
                    points.append(name + "".join(f" {v:.3f}" for v in pts.ravel())
                                  + f" {score:.4f}\n")
    pairs = _template_pairs(np.array(template_class), impostor_pairs, rng)
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(tid_mid))
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(points))
    (meta / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {lab}\n" for a, b, lab in pairs))
    genuine = sum(lab for _, _, lab in pairs)
    return {"images": n_img, "templates": len(template_class), "media": mid,
            "genuine_pairs": genuine, "impostor_pairs": len(pairs) - genuine}


def _template_pairs(cls: np.ndarray, impostors: int, rng: np.random.Generator
                    ) -> List[Tuple[int, int, int]]:
    """(tid1, tid2, label) sorted by tids: every same-class pair plus `impostors` distinct
    different-class pairs (fewer if that many do not exist). Template ids are 1-based."""
    n = cls.size
    genuine = [(int(a), int(b)) for c in np.unique(cls)
               for i, a in enumerate(np.flatnonzero(cls == c))
               for b in np.flatnonzero(cls == c)[i + 1:]]
    target = min(impostors, n * (n - 1) // 2 - len(genuine))
    if n * (n - 1) // 2 <= ENUMERATE_PAIRS_UP_TO:
        # Few templates: choose among all different-class pairs (rejection sampling would
        # crawl when nearly all of them are wanted).
        lo, hi = np.triu_indices(n, 1)
        diff = cls[lo] != cls[hi]
        pick = np.sort(rng.choice(int(diff.sum()), target, replace=False))
        keys = lo[diff][pick].astype(np.int64) * n + hi[diff][pick]
    else:
        keys = _sample_pair_keys(cls, target, rng)
    pairs = [(a + 1, b + 1, 1) for a, b in genuine]
    pairs += [(int(k // n) + 1, int(k % n) + 1, 0) for k in keys.tolist()]
    return sorted(pairs)


def _sample_pair_keys(cls: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """`target` distinct different-class pairs as keys lo * n + hi, by rejection sampling."""
    n = cls.size
    keys = np.zeros(0, np.int64)
    while keys.size < target:
        a, b = rng.integers(0, n, size=(2, 2 * (target - keys.size) + 16))
        ok = cls[a] != cls[b]
        lo, hi = np.minimum(a, b)[ok], np.maximum(a, b)[ok]
        keys = np.concatenate([keys, lo.astype(np.int64) * n + hi])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
    return keys[:target]


def write_megaface(root: Path, probes: Sequence[ClassImages],
                   distractors: Sequence[ClassImages]) -> Dict[str, int]:
    """MegaFace layout: facescrub_images/<class>/<design>.jpg probes listed in facescrub_lst,
    megaface_images/<class>/<design>.jpg distractors (further classes) listed in megaface_lst."""
    counts = {}
    for kind, sets in (("facescrub", probes), ("megaface", distractors)):
        lines = []
        for name, images in sets:
            folder = root / f"{kind}_images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for design, img in images:
                rel = f"{name}/d{design:02d}.jpg"
                (folder / f"d{design:02d}.jpg").write_bytes(encode_jpeg(img))
                lines.append(rel + "\n")
        (root / f"{kind}_lst").write_text("".join(lines))
        counts[f"{kind}_images"] = len(lines)
    return counts
