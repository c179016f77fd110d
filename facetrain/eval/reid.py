"""Person re-ID evaluation on Market-1501 / DukeMTMC-reID folders.

    ROOT/query/*.jpg, ROOT/bounding_box_test/*.jpg   names PPPP_cC..._*.jpg (person id, camera)

Rules (the datasets' official code): for each query, gallery images with the same person id AND
the same camera are excluded; gallery images with person id -1 ("junk") are excluded for every
query; id 0000 ("distractor") stays as a negative. Queries left without a true match are skipped
and counted. Similarity = cosine of L2-normalised features. Reports mAP and CMC rank-1/5/10.
Features (--features) are query rows (sorted file names) followed by gallery rows (sorted).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from facetrain.eval.embed import as_bgr_image, l2_normalize
from facetrain.eval.metrics import cmc_map_from_ranks

NAME_RE = re.compile(r"^(-?\d+)_c(\d+)")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
QUERY_DIR, GALLERY_DIR = "query", "bounding_box_test"


def parse_folder(folder: str | Path) -> Tuple[List[Path], np.ndarray, np.ndarray]:
    """Sorted image files of a folder -> (paths, person ids[N], camera ids[N])."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"re-ID folder {folder} is missing (expected Market-1501/Duke "
                                f"layout with {QUERY_DIR}/ and {GALLERY_DIR}/)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    pids, cams = [], []
    for p in paths:
        m = NAME_RE.match(p.name)
        if m is None:
            raise ValueError(f"{p}: file name does not start with <person id>_c<camera> "
                             "(e.g. 0002_c1s1_000451_03.jpg); rename or remove it")
        pids.append(int(m.group(1)))
        cams.append(int(m.group(2)))
    return paths, np.array(pids, dtype=np.int64), np.array(cams, dtype=np.int64)


def evaluate(qf: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, gf: np.ndarray,
             g_pids: np.ndarray, g_cams: np.ndarray, ranks: Sequence[int] = (1, 5, 10),
             block: int = 512, max_cmc: int = 50) -> Dict[str, object]:
    """mAP and CMC of query features qf[Q, D] against gallery gf[G, D] with the exclusion rules
    in the module docstring; query blocks bound the memory at block x G."""
    if qf.shape[0] != q_pids.size or gf.shape[0] != g_pids.size:
        raise ValueError(f"features ({qf.shape[0]} query, {gf.shape[0]} gallery rows) do not match "
                         f"the folders ({q_pids.size} query, {g_pids.size} gallery images)")
    from facetrain.eval.checks import check_features
    check_features(np.asarray(qf), "query features")
    check_features(np.asarray(gf), "gallery features")
    q = torch.from_numpy(l2_normalize(qf))
    g = torch.from_numpy(l2_normalize(gf))
    ranks_all = tuple(sorted(set(ranks) | set(range(1, max_cmc + 1))))
    hits, aps, skipped = [], [], 0
    for s in range(0, q.shape[0], block):
        sim = (q[s:s + block] @ g.T).numpy()
        order = np.argsort(-sim, axis=1, kind="stable")
        qp, qc = q_pids[s:s + block, None], q_cams[s:s + block, None]
        gp, gc = g_pids[order], g_cams[order]
        match = gp == qp
        valid = ~((gp == qp) & (gc == qc)) & (gp != -1)
        res = cmc_map_from_ranks(match, valid, ranks_all) if (match & valid).any() else None
        if res is None:
            skipped += len(match)
            continue
        n = res["queries_scored"]
        hits.append((n, [res[f"rank{r}"] for r in ranks_all]))
        aps.append((n, res["mAP"]))
        skipped += res["queries_skipped"]
    total = sum(n for n, _ in aps)
    if total == 0:
        raise ValueError("no query has a true match in the gallery (after same-camera exclusion)")
    cmc = np.sum([n * np.asarray(h) for n, h in hits], axis=0) / total
    cmc_by_rank = dict(zip(ranks_all, cmc.tolist()))
    out: Dict[str, object] = {f"rank{r}": cmc_by_rank[r] for r in ranks}
    out["mAP"] = float(sum(n * a for n, a in aps) / total)
    out["cmc"] = [cmc_by_rank[r] for r in range(1, max_cmc + 1)]
    out.update({"queries_scored": int(total), "queries_skipped": int(skipped),
                "gallery": int(g_pids.size)})
    return out


class FolderImages:
    """Dataset of decoded BGR images for a list of paths (errors name the file)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return as_bgr_image(self.paths[i].read_bytes(), str(self.paths[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))
