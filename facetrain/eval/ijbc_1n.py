"""IJB-C 1:N (open-set identification), run when the gallery/probe CSVs are present::

    ROOT/meta/ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv, ijbc_1N_probe_mixed.csv

Each CSV has a header row and TEMPLATE_ID,SUBJECT_ID as its first two columns (one row per
image; a template's rows repeat its ids). Template features come from the same pooling as 1:1
(the templates must appear in face_tid_mid.txt). Each gallery is scored on its own, as in the
IJB-C protocol: probes whose subject is enrolled in it are mated, the others non-mated.
Reported per gallery and averaged: rank-1/5/10 (mated probes) and TPIR at FPIR (a mated probe
counts when its subject is rank 1 and scores above the threshold; the threshold allows
floor(FPIR x non-mated) non-mated top scores above it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from facetrain.eval.ijbc import template_rows
from facetrain.eval.metrics import tpr_at_fpr_split

GALLERIES = ("G1", "G2")
DEFAULT_FPIRS = (0.01, 0.1)


def csv_path(root: Path, prefix: str, part: str) -> Path:
    return Path(root) / "meta" / f"{prefix}_1N_{part}.csv"


PARTS = ("gallery_G1", "gallery_G2", "probe_mixed")


def missing_1n(root: str | Path, prefix: str = "ijbc") -> List[Path]:
    """The 1:N CSVs that are absent; all of them (1:1-only folder) or none is consistent,
    anything in between is a damaged copy the CLI must not silently evaluate without 1:N."""
    return [csv_path(Path(root), prefix, p) for p in PARTS
            if not csv_path(Path(root), prefix, p).is_file()]


def read_template_subjects(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """CSV -> (template_ids[T], subject_ids[T]) one per template; a template listed with two
    subjects is an error naming the line."""
    seen: Dict[int, Tuple[int, int]] = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 or not line.strip():
                continue                                   # header
            f = line.strip().split(",")
            try:
                tid, sid = int(f[0]), int(f[1])
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{lineno}: expected TEMPLATE_ID,SUBJECT_ID,... integers; "
                                 f"got {line.strip()[:80]!r}") from None
            if tid in seen and seen[tid][0] != sid:
                raise ValueError(f"{path}:{lineno}: template {tid} has subject {sid} here but "
                                 f"{seen[tid][0]} on line {seen[tid][1]}")
            seen.setdefault(tid, (sid, lineno))
    if not seen:
        raise ValueError(f"{path} has no template rows below its header")
    tids = np.fromiter(seen.keys(), dtype=np.int64)
    sids = np.fromiter((v[0] for v in seen.values()), dtype=np.int64)
    return tids, sids


def identify(probe: np.ndarray, probe_sid: np.ndarray, gallery: np.ndarray, gallery_sid: np.ndarray,
             ranks: Sequence[int] = (1, 5, 10), fpirs: Sequence[float] = DEFAULT_FPIRS,
             block: int = 4096) -> Dict[str, object]:
    """Open-set identification of L2-normalised probe[P, D] against gallery[G, D] (one template
    per gallery subject expected, several allowed: a subject's best template counts)."""
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    mated = np.isin(probe_sid, gallery_sid)
    rank_of_true = np.full(probe.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    true_score = np.full(probe.shape[0], -np.inf)
    top_score = np.empty(probe.shape[0])
    for s in range(0, probe.shape[0], block):
        sc = torch.from_numpy(np.ascontiguousarray(probe[s:s + block], np.float32)) @ g.T
        sc = sc.numpy()
        top_score[s:s + block] = sc.max(1)
        same = gallery_sid[None, :] == probe_sid[s:s + block, None]
        best_true = np.where(same, sc, -np.inf).max(1)
        rank = (sc > best_true[:, None]).sum(1)            # gallery entries strictly better
        m = mated[s:s + block]
        rank_of_true[s:s + block][m] = rank[m]
        true_score[s:s + block][m] = best_true[m]
    out: Dict[str, object] = {"mated_probes": int(mated.sum()),
                              "nonmated_probes": int((~mated).sum())}
    for r in ranks:
        out[f"rank{r}"] = float(np.mean(rank_of_true[mated] < r)) if mated.any() else 0.0
    if mated.any() and (~mated).any():
        # a mated probe is a true positive at threshold t when its subject is rank 1 and >= t
        pos = np.where(rank_of_true[mated] == 0, true_score[mated], -np.inf)
        tpir = tpr_at_fpr_split(pos, top_score[~mated], fpirs)
        out["tpir_at_fpir"] = tpir
    return out


def identify_templates(root: Path, prefix: str, template_ids: np.ndarray, tfeat: np.ndarray,
                       ranks: Sequence[int] = (1, 5, 10), fpirs: Sequence[float] = DEFAULT_FPIRS
                       ) -> Dict[str, object]:
    """1:N over both galleries from pooled templates (see `ijbc.pool_templates`)."""
    p_path = csv_path(root, prefix, "probe_mixed")
    p_tids, p_sids = read_template_subjects(p_path)
    probe = tfeat[template_rows(template_ids, p_tids, f"{p_path} template")]
    out: Dict[str, object] = {}
    for gname in GALLERIES:
        g_path = csv_path(root, prefix, f"gallery_{gname}")
        g_tids, g_sids = read_template_subjects(g_path)
        gal = tfeat[template_rows(template_ids, g_tids, f"{g_path} template")]
        out[gname] = identify(probe, p_sids, gal, g_sids, ranks, fpirs)
    keys = [f"rank{r}" for r in ranks]
    out["mean"] = {k: float(np.mean([out[g][k] for g in GALLERIES])) for k in keys}
    if all("tpir_at_fpir" in out[g] for g in GALLERIES):
        out["mean"]["tpir_at_fpir"] = {k: _mean_or_none([out[g]["tpir_at_fpir"][k]
                                                         for g in GALLERIES])
                                       for k in out[GALLERIES[0]]["tpir_at_fpir"]}
    return out


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the galleries; None (n/a) when a gallery could not resolve the FPIR."""
    return None if any(v is None for v in values) else float(np.mean(values))
