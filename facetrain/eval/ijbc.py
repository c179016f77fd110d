"""IJB-C / IJB-B 1:1 verification: meta files, 5-point alignment, template pooling, chunked
pair scores, TPR at FPR.

Layout (prefix "ijbc" or "ijbb")::

    ROOT/loose_crop/<image_name>
    ROOT/meta/<prefix>_face_tid_mid.txt          image_name template_id media_id
    ROOT/meta/<prefix>_name_5pts_score.txt       image_name x1 y1 ... x5 y5 faceness (same order)
    ROOT/meta/<prefix>_template_pair_label.txt   tid1 tid2 label

Template feature: image features (optionally L2-normalised first, optionally scaled by the
faceness score) are averaged within each (template, media), the media means summed per template,
then L2-normalised. A pair's score is the cosine of its two template features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from facetrain.build import align as _align
from facetrain.build.align import ARCFACE_TEMPLATE_112  # noqa: F401  (re-exported: one template)
from facetrain.eval.embed import l2_normalize
from facetrain.eval.metrics import DEFAULT_FPRS, roc_curve, tpr_at_fpr_from_roc


@dataclass(frozen=True)
class IJBMeta:
    """Parsed meta files; arrays are in the order of the face_tid_mid file (N images, P pairs)."""
    root: Path
    prefix: str
    names: List[str]            # [N] image names under loose_crop/
    tids: np.ndarray            # [N] int64 template id
    mids: np.ndarray            # [N] int64 media id
    landmarks: Optional[np.ndarray]   # [N, 5, 2] float32 (None when the file is absent)
    faceness: Optional[np.ndarray]    # [N] float32
    pair_t1: np.ndarray         # [P] int64
    pair_t2: np.ndarray         # [P] int64
    pair_label: np.ndarray      # [P] bool


def meta_path(root: Path, prefix: str, kind: str) -> Path:
    return Path(root) / "meta" / f"{prefix}_{kind}.txt"


def _read_table(path: Path, n_fields: int, what: str) -> List[List[str]]:
    """Whitespace-separated rows with exactly `n_fields` fields; errors name file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it should hold one line per {what}")
    rows = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != n_fields:
                raise ValueError(f"{path}:{lineno}: expected {n_fields} fields ({what}); got "
                                 f"{len(fields)}: {line.strip()[:120]!r}")
            rows.append(fields + [lineno])
    if not rows:
        raise ValueError(f"{path} is empty: it should hold one line per {what}")
    return rows


def _column(rows: List[List], col: int, dtype, path: Path, name: str) -> np.ndarray:
    try:
        return np.array([r[col] for r in rows], dtype=dtype)
    except ValueError:
        for r in rows:
            try:
                dtype(r[col])
            except ValueError:
                raise ValueError(f"{path}:{r[-1]}: field {name}={r[col]!r} is not a valid "
                                 f"{dtype.__name__}") from None
        raise


def _refuse_repeated_images(rows: List[List], path: Path) -> None:
    """Each line of face_tid_mid is one face crop: an image listed twice would enter its
    template's mean twice (or two templates), silently changing the scores. Error naming both
    lines."""
    first: Dict[str, int] = {}
    for r in rows:
        name, lineno = r[0], r[-1]
        if name in first:
            raise ValueError(f"{path}:{lineno}: image {name!r} is listed again (first on line "
                             f"{first[name]}); each face crop must be listed once, or it is "
                             "counted twice. Remove the repeated line (and its line in "
                             "name_5pts_score.txt)")
        first[name] = lineno


def _load_fast(path: Path, dtype: np.dtype) -> Optional[np.ndarray]:
    """numpy's C reader on a whitespace table, or None when it refuses the file (a wrong field
    count, a bad number, no rows, unreadable): then the line-by-line reader runs and names the
    file and line. It accepts a subset of what that reader accepts (a structured dtype checks
    every row's field count), so the fast path never lets a bad line through."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # "input contained no data"
            arr = np.loadtxt(path, dtype=dtype, comments=None, encoding="utf-8", ndmin=1)
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    return arr if arr.shape[0] else None


def _read_meta_fast(root: Path, prefix: str, need_landmarks: bool,
                    skip_landmarks: bool = False) -> Optional[IJBMeta]:
    """read_meta for well-formed files at C speed (IJB-C's 15.7M pair lines in ~1 s instead of
    ~23 s, without a Python object per field). None on anything irregular, so that the careful
    reader below raises its error with file and line."""
    tm_path = meta_path(root, prefix, "face_tid_mid")
    pr_path = meta_path(root, prefix, "template_pair_label")
    lmk_path = meta_path(root, prefix, "name_5pts_score")
    if not (tm_path.is_file() and pr_path.is_file()):
        return None
    tm = _load_fast(tm_path, np.dtype([("name", object), ("tid", np.int64), ("mid", np.int64)]))
    if tm is None:
        return None
    names = tm["name"].tolist()
    if len(set(names)) != len(names):
        return None
    pr = _load_fast(pr_path, np.dtype([("t", np.int64, (3,))]))
    if pr is None:
        return None
    pr = pr["t"]
    lab = pr[:, 2]
    if np.any(lab & ~np.int64(1)):                      # a label other than 0 or 1
        return None
    landmarks = faceness = None
    if need_landmarks or (lmk_path.is_file() and not skip_landmarks):
        if not lmk_path.is_file():
            return None
        lm = _load_fast(lmk_path, np.dtype([("name", object), ("v", np.float32, (11,))]))
        if lm is None or lm.shape[0] != len(names) or lm["name"].tolist() != names:
            return None
        vals = lm["v"]
        landmarks = np.ascontiguousarray(vals[:, :10]).reshape(-1, 5, 2)
        faceness = np.ascontiguousarray(vals[:, 10])
    return IJBMeta(root, prefix, names, np.ascontiguousarray(tm["tid"]),
                   np.ascontiguousarray(tm["mid"]), landmarks, faceness, pr[:, 0], pr[:, 1],
                   lab.astype(bool))


def read_meta(root: str | Path, prefix: str = "ijbc", need_landmarks: bool = True,
              skip_landmarks: bool = False) -> IJBMeta:
    """Parse the three meta files and check they agree (same images, same order).
    need_landmarks=False reads name_5pts_score only when it exists; skip_landmarks=True (with
    need_landmarks=False) never reads it (landmarks and faceness None): precomputed features
    without faceness weighting use neither, and IJB-C's file takes a second to parse."""
    root = Path(root)
    skip_landmarks = skip_landmarks and not need_landmarks
    fast = _read_meta_fast(root, prefix, need_landmarks, skip_landmarks)
    if fast is not None:
        return fast
    tm_path = meta_path(root, prefix, "face_tid_mid")
    tm = _read_table(tm_path, 3, "image: image_name template_id media_id")
    names = [r[0] for r in tm]
    _refuse_repeated_images(tm, tm_path)
    tids = _column(tm, 1, np.int64, tm_path, "template_id")
    mids = _column(tm, 2, np.int64, tm_path, "media_id")
    pr_path = meta_path(root, prefix, "template_pair_label")
    pr = _read_table(pr_path, 3, "pair: tid1 tid2 label")
    t1 = _column(pr, 0, np.int64, pr_path, "tid1")
    t2 = _column(pr, 1, np.int64, pr_path, "tid2")
    lab = _column(pr, 2, np.int64, pr_path, "label")
    bad = np.flatnonzero((lab != 0) & (lab != 1))
    if bad.size:
        raise ValueError(f"{pr_path}:{pr[bad[0]][-1]}: label must be 0 or 1; got {lab[bad[0]]}")
    lmk_path = meta_path(root, prefix, "name_5pts_score")
    landmarks = faceness = None
    if need_landmarks or (lmk_path.is_file() and not skip_landmarks):
        lm = _read_table(lmk_path, 12, "image: image_name x1 y1 ... x5 y5 faceness_score")
        if len(lm) != len(tm):
            raise ValueError(f"{lmk_path} lists {len(lm)} images but {tm_path} lists {len(tm)}; "
                             "both must list the same images in the same order")
        for r, name in zip(lm, names):
            if r[0] != name:
                raise ValueError(f"{lmk_path}:{r[-1]}: image {r[0]!r} but {tm_path} has {name!r} "
                                 "at this position; the files must list images in the same order")
        vals = np.stack([_column(lm, c, np.float32, lmk_path, f"field {c + 1}")
                         for c in range(1, 12)], axis=1)
        landmarks = vals[:, :10].reshape(-1, 5, 2)
        faceness = vals[:, 10]
    return IJBMeta(root, prefix, names, tids, mids, landmarks, faceness, t1, t2, lab.astype(bool))


def align_face(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Warp a BGR image so its 5 points [5, 2] land on the ArcFace template scaled to
    `image_size`: the project's one alignment (facetrain.build.align: least-squares similarity,
    cv2.warpAffine), the same that aligns training and pack images."""
    return _align.align_face(img, landmarks, image_size)


class AlignedImages:
    """Dataset over loose_crop/ images aligned on the fly: item i = 112x112 BGR uint8 crop of
    image i in meta order. Errors name the image and its meta line."""

    def __init__(self, meta: IJBMeta, image_size: int = 112) -> None:
        if meta.landmarks is None:
            raise ValueError(f"{meta_path(meta.root, meta.prefix, 'name_5pts_score')} is needed to "
                             "align the images (or pass precomputed `features`)")
        self.meta, self.image_size = meta, image_size

    def __len__(self) -> int:
        return len(self.meta.names)

    def check_exist(self) -> None:
        """Fail before a long extraction when images are missing (first one and count named)."""
        crop = self.meta.root / "loose_crop"
        missing = [i for i, n in enumerate(self.meta.names) if not (crop / n).is_file()]
        if missing:
            tm = meta_path(self.meta.root, self.meta.prefix, "face_tid_mid")
            raise FileNotFoundError(f"{crop / self.meta.names[missing[0]]} (line {missing[0] + 1} "
                                    f"of {tm}) does not exist; {len(missing)} images are missing")

    def __getitem__(self, i: int) -> np.ndarray:
        import cv2
        path = self.meta.root / "loose_crop" / self.meta.names[i]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            lmk = meta_path(self.meta.root, self.meta.prefix, "name_5pts_score")
            raise ValueError(f"{path} (line {i + 1} of {lmk}) is missing or cannot be decoded")
        return align_face(img, self.meta.landmarks[i], self.image_size)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def pool_templates(features: np.ndarray, tids: np.ndarray, mids: np.ndarray,
                   faceness: Optional[np.ndarray] = None, normalize_images: bool = False,
                   chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """features[N, D] -> (template_ids[T] sorted, template_features[T, D] L2-normalised).

    Media averaging + template summing is one weighted sum: image i gets weight
    faceness_i / (images in its (template, media)), then index_add per template in image order.
    Chunks of `chunk` rows go through one reused buffer, so the extra memory is chunk x D and
    stays in cache (fresh 100 MB temporaries per chunk cost more in page faults than the sum).
    """
    n = features.shape[0]
    if not (tids.shape[0] == mids.shape[0] == n):
        raise ValueError(f"{n} feature rows but {tids.shape[0]} template ids and {mids.shape[0]} "
                         "media ids; features must follow the face_tid_mid order")
    t_ids, t_inv = np.unique(tids, return_inverse=True)
    m_ids, m_inv = np.unique(mids, return_inverse=True)
    _, k_inv, k_cnt = np.unique(t_inv.astype(np.int64) * len(m_ids) + m_inv,
                                return_inverse=True, return_counts=True)
    w = 1.0 / k_cnt[k_inv].astype(np.float32)
    if faceness is not None:
        w = w * np.asarray(faceness, dtype=np.float32)
    d = features.shape[1]
    out = torch.zeros(len(t_ids), d, dtype=torch.float32)
    idx_all = torch.from_numpy(t_inv.astype(np.int64))
    w_all = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    # a --features memmap is read-only and torch wants writable memory: read those through a
    # reused float32 buffer; a writable float32 array is used in place
    direct = (isinstance(features, np.ndarray) and features.dtype == np.float32
              and features.flags.c_contiguous and features.flags.writeable
              and not normalize_images)
    src = torch.from_numpy(features) if direct else None
    c = max(1, min(chunk, n))
    stage = None if direct else np.empty((c, d), dtype=np.float32)
    prod = torch.empty(c, d, dtype=torch.float32)
    # a read-only float32 array (a --features memmap): the weighting reads it straight into the
    # buffer (np.multiply rounds float32 products as torch.mul does: the same bits, one pass less)
    weigh_in_numpy = (not direct and not normalize_images and isinstance(features, np.ndarray)
                      and features.dtype == np.float32)
    w32 = w_all.numpy()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if weigh_in_numpy:
            x = torch.from_numpy(np.multiply(features[s:e], w32[s:e, None], out=stage[:e - s]))
        else:
            if direct:
                f = src[s:e]
            else:
                np.copyto(stage[:e - s], features[s:e], casting="unsafe")
                f = torch.from_numpy(l2_normalize(stage[:e - s]) if normalize_images
                                     else stage[:e - s])
            x = torch.mul(f, w_all[s:e].unsqueeze(1), out=prod[:e - s])
        out.index_add_(0, idx_all[s:e], x)
    return t_ids, l2_normalize(out.numpy())


def template_rows(template_ids: np.ndarray, query: np.ndarray, what: str) -> np.ndarray:
    """Map template ids to rows of `template_ids` (sorted); unknown ids are an error naming the
    first offending entry of `what`."""
    query = np.asarray(query, dtype=np.int64)
    if template_ids.size and 0 <= template_ids[0] and template_ids[-1] < 64 * 2**20:
        # small non-negative ids (IJB-C's go to ~200K): a lookup table, O(P) instead of a
        # binary search per pair
        lut = np.full(int(template_ids[-1]) + 2, -1, dtype=np.int32)
        lut[template_ids] = np.arange(template_ids.size, dtype=np.int32)
        rows = lut[np.clip(query, -1, template_ids[-1] + 1)]       # -1 and beyond map to -1
        bad = np.flatnonzero(rows < 0)
    else:
        rows = np.minimum(np.searchsorted(template_ids, query), len(template_ids) - 1)
        bad = np.flatnonzero(template_ids[rows] != query)
    if bad.size:
        raise ValueError(f"{what} entry {bad[0] + 1} uses template {query[bad[0]]}, which has no "
                         f"image in the face_tid_mid list ({bad.size} such entries)")
    return rows


# The product of the used rows is worth it while it holds at most this many scores per pair:
# one thread, 512-d, a row-pair gather + dot costs 1.3 us (1,024-pair chunks), the product
# 20 ns a score (2026-12-07, benchmarks/RESULTS.md). IJB-C's product: 4.4 scores a pair.
_DENSE = 64


def _compact(rows: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(used rows sorted, position of each entry among them): np.unique(return_inverse=True)
    by a lookup table over the n rows, O(P) instead of a 15M-element sort."""
    used = np.zeros(n, dtype=bool)
    used[rows] = True
    uniq = np.flatnonzero(used)
    lut = np.zeros(n, dtype=np.int32)               # int32: half the memory of 15M indices
    lut[uniq] = np.arange(uniq.size, dtype=np.int32)
    return uniq, lut[rows]


def score_pairs(tfeat: np.ndarray, r1: np.ndarray, r2: np.ndarray,
                block_bytes: int = 512 * 2**20) -> np.ndarray:
    """Cosine scores [P] float32 of template rows r1[P] vs r2[P] (tfeat L2-normalised).

    Only ~23K templates serve ~15.7M pairs, so the scores are blocks of one matrix product
    (rows used as r1) x (rows used as r2), each block indexed by its pairs and then dropped:
    memory is one block of at most `block_bytes` (block_rows x |r2 rows| float32), independent
    of the pair count (IJB-C: 3.5K x 19.6K templates used, 277 MB, a single block). When the
    pairs are too sparse for that product to pay off, rows are gathered per chunk of pairs.
    """
    if r1.shape[0] == 0:
        return np.empty(0, dtype=np.float32)
    return _score_compact(tfeat, *_compact(r1, tfeat.shape[0]), *_compact(r2, tfeat.shape[0]),
                          block_bytes)


def _small_ids(template_ids: np.ndarray) -> bool:
    """Non-negative ids below 64M (IJB-C's go to ~200K): tables indexed by id are cheap."""
    return bool(template_ids.size and 0 <= template_ids[0] and template_ids[-1] < 64 * 2**20)


def _id_table(template_ids: np.ndarray, query: np.ndarray, what: str
              ) -> Tuple[np.ndarray, np.ndarray]:
    """For small ids (`_small_ids`): (rows of `template_ids` that `query` uses, sorted; a table
    id -> position among those rows, -1 for unused ids). Two passes over the query (min/max,
    one scatter); a query id without a template raises `template_rows`' error."""
    hi = int(template_ids[-1])
    if query.size and (query.min() < 0 or query.max() > hi):
        template_rows(template_ids, query, what)    # raises, naming the first bad entry
    used = np.zeros(hi + 1, dtype=bool)
    used[query] = True
    exists = np.zeros(hi + 1, dtype=bool)
    exists[template_ids] = True
    if np.any(used > exists):
        template_rows(template_ids, query, what)    # raises, naming the first bad entry
    used_ids = np.flatnonzero(used)
    table = np.full(hi + 1, -1, dtype=np.int32)
    table[used_ids] = np.arange(used_ids.size, dtype=np.int32)
    return np.searchsorted(template_ids, used_ids), table


def _template_positions(template_ids: np.ndarray, query: np.ndarray, what: str
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """`_compact(template_rows(template_ids, query, what), T)`: for small ids from one table
    (a scatter and a gather over the query instead of two gathers and a scatter); the same
    result and the same error otherwise."""
    q = np.asarray(query, dtype=np.int64)
    if not _small_ids(template_ids):
        return _compact(template_rows(template_ids, q, what), template_ids.size)
    rows, table = _id_table(template_ids, q, what)
    return rows, np.take(table, q, mode="clip")     # ids checked in range by _id_table


def _pair_scores(tfeat: np.ndarray, template_ids: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                 what: str, block_bytes: int = 512 * 2**20) -> np.ndarray:
    """Cosine scores [P] float32 of the pairs (t1[i], t2[i]) of template ids. IJB-C's case
    (small ids, one product block, dense pairs) is fused: one product of the used rows, then per
    chunk of pairs two table gathers, an add and the score gather, with no [P] index array kept;
    any other case goes through `_template_positions` and `_score_compact`."""
    t1, t2 = np.asarray(t1, dtype=np.int64), np.asarray(t2, dtype=np.int64)
    p = t1.shape[0]
    if p == 0:
        return np.empty(0, dtype=np.float32)
    if not _small_ids(template_ids):
        return _score_compact(tfeat, *_template_positions(template_ids, t1, what),
                              *_template_positions(template_ids, t2, what), block_bytes)
    a_rows, a_tab = _id_table(template_ids, t1, what)
    b_rows, b_tab = _id_table(template_ids, t2, what)
    n_b = b_rows.size
    if a_rows.size * n_b * 4 > block_bytes or a_rows.size * n_b > _DENSE * p:
        return _score_compact(tfeat, a_rows, np.take(a_tab, t1, mode="clip"),
                              b_rows, np.take(b_tab, t2, mode="clip"), block_bytes)
    t = torch.from_numpy(np.ascontiguousarray(tfeat, dtype=np.float32))
    prod = torch.mm(t[torch.from_numpy(a_rows)], t[torch.from_numpy(b_rows)].T).numpy().ravel()
    a_flat = a_tab.astype(np.int64) * n_b            # id -> its product row's offset
    b_pos = b_tab.astype(np.int64)
    scores = np.empty(p, dtype=np.float32)
    step = min(p, 1 << 18)                           # 2 MB index chunks stay in cache
    fa, fb = np.empty(step, dtype=np.int64), np.empty(step, dtype=np.int64)
    for s in range(0, p, step):
        e = min(p, s + step)
        # mode="clip": the ids are checked by _id_table; "raise" buffers the output
        np.take(a_flat, t1[s:e], out=fa[:e - s], mode="clip")
        np.take(b_pos, t2[s:e], out=fb[:e - s], mode="clip")
        fa[:e - s] += fb[:e - s]
        np.take(prod, fa[:e - s], out=scores[s:e], mode="clip")
    return scores


def _score_compact(tfeat: np.ndarray, a_rows: np.ndarray, a_inv: np.ndarray,
                   b_rows: np.ndarray, b_inv: np.ndarray, block_bytes: int) -> np.ndarray:
    """score_pairs from compacted rows: pair i is (a_rows[a_inv[i]], b_rows[b_inv[i]])."""
    p = a_inv.shape[0]
    scores = np.empty(p, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(tfeat, dtype=np.float32))
    if a_rows.size * b_rows.size > _DENSE * p:                  # sparse: gather instead
        r1, r2 = a_rows[a_inv], b_rows[b_inv]
        step = 1024                     # x, y, x * y: 2 MB each at 512-d, in cache
        for s in range(0, p, step):
            x, y = t[torch.from_numpy(r1[s:s + step])], t[torch.from_numpy(r2[s:s + step])]
            scores[s:s + step] = (x * y).sum(1).numpy()
        return scores
    ta, tb = t[torch.from_numpy(a_rows)], t[torch.from_numpy(b_rows)]
    block_rows = max(1, block_bytes // (4 * b_rows.size))
    n_blocks = -(-a_rows.size // block_rows)
    if n_blocks == 1:                                          # one product, one gather
        prod = torch.mm(ta, tb.T).numpy().ravel()
        step = 1 << 20                  # index chunks of 8 MB instead of one [P] int64 array
        for s in range(0, p, step):
            flat = a_inv[s:s + step].astype(np.int64)
            flat *= b_rows.size
            flat += b_inv[s:s + step]
            np.take(prod, flat, out=scores[s:s + step])
        return scores
    block_of = (a_inv // block_rows).astype(np.uint16 if n_blocks < 65536 else np.int64)
    order = np.argsort(block_of, kind="stable")                # radix sort on uint16
    bounds = np.searchsorted(block_of[order], np.arange(n_blocks + 1))
    for b in range(n_blocks):
        idx = order[bounds[b]:bounds[b + 1]]
        if idx.size == 0:
            continue
        lo = b * block_rows
        block = torch.mm(ta[lo:lo + block_rows], tb.T).numpy()     # [block_rows, |B|]
        scores[idx] = block[a_inv[idx] - lo, b_inv[idx]]
    return scores


def roc_from_sorted(pos: np.ndarray, neg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC of genuine scores `pos` and impostor scores `neg` (each sorted
    ascending), keeping only its corners: the start, the end, and for each distinct genuine score
    the points just before and at it. The dropped points are the inner points of horizontal runs
    (impostor-only thresholds), so the polyline is the full `metrics.roc_curve` one (same float
    values at every kept point) and "the largest TPR with FPR <= t" is unchanged: the last full
    point with FPR <= t has the TPR of the kept point that starts its run. IJB-C: ~40K points
    instead of 15.7M, from binary searches into the sorted impostors (no sort of all scores)."""
    n_pos, n_neg = pos.size, neg.size
    g = pos[np.r_[pos[1:] != pos[:-1], True]][::-1]        # distinct genuine scores, descending
    tp_ge = n_pos - np.searchsorted(pos, g, "left")
    tp_gt = n_pos - np.searchsorted(pos, g, "right")
    fp_ge = n_neg - np.searchsorted(neg, g, "left")
    fp_gt = n_neg - np.searchsorted(neg, g, "right")
    fps = np.r_[0, np.stack([fp_gt, fp_ge], 1).ravel(), n_neg].astype(np.int64)
    tps = np.r_[0, np.stack([tp_gt, tp_ge], 1).ravel(), n_pos].astype(np.int64)
    keep = np.r_[True, (fps[1:] != fps[:-1]) | (tps[1:] != tps[:-1])]
    return fps[keep] / n_neg, tps[keep] / n_pos


def verify_features(meta: IJBMeta, features: np.ndarray, use_faceness: bool = False,
                    normalize_images: bool = False, fprs: Sequence[float] = DEFAULT_FPRS,
                    fpr_rule: str = "le") -> Dict[str, object]:
    """IJB 1:1 from image features[N, D] in face_tid_mid order -> report dict (with "roc").
    fpr_rule: "le" or "nearest" (see metrics.tpr_at_fpr_from_roc); TPR at an FPR the impostor
    pairs cannot resolve is None. "roc" holds the curve's corners (`roc_from_sorted`): the same
    polyline and TPR@FPR ("le") as the full one-point-per-score ROC; "nearest" reads the full
    ROC, whose every point it may pick."""
    tm_path = meta_path(meta.root, meta.prefix, "face_tid_mid")
    if features.shape[0] != len(meta.names):
        raise ValueError(f"{features.shape[0]} feature rows but {tm_path} lists {len(meta.names)} "
                         "images; the rows must follow that file's order")
    if use_faceness and meta.faceness is None:
        raise ValueError("faceness weighting needs "
                         f"{meta_path(meta.root, meta.prefix, 'name_5pts_score')}")
    t_ids, tfeat = pool_templates(features, meta.tids, meta.mids,
                                  meta.faceness if use_faceness else None, normalize_images)
    pr = meta_path(meta.root, meta.prefix, "template_pair_label")
    scores = _pair_scores(tfeat, t_ids, meta.pair_t1, meta.pair_t2, f"{pr} pair")
    labels = meta.pair_label
    pos, neg = np.sort(scores[labels]), scores[~labels]
    neg.sort()                                     # in place: one sort, the only large one
    n_gen = int(pos.size)
    if not (pos.size and neg.size and np.isfinite(neg[[0, -1]]).all()
            and np.isfinite(pos[[0, -1]]).all()):
        roc_curve(labels, scores)                  # raises its error (one class, NaN score)
    fpr, tpr = roc_from_sorted(pos, neg)
    if fpr_rule == "le":                           # exact on the corner points (see there)
        table = tpr_at_fpr_from_roc(fpr, tpr, fprs, neg.size, fpr_rule)
    else:                                          # "nearest" picks among every ROC point
        f_all, t_all, _ = roc_curve(labels, scores)
        table = tpr_at_fpr_from_roc(f_all, t_all, fprs, neg.size, fpr_rule)
    return {"tpr_at_fpr": table,
            "fpr_rule": fpr_rule, "images": len(meta.names),
            "templates": int(t_ids.size), "pairs": int(scores.size),
            "genuine_pairs": n_gen, "impostor_pairs": int(scores.size - n_gen), "roc": (fpr, tpr),
            "template_ids": t_ids, "template_features": tfeat}
