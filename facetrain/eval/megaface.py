"""MegaFace Challenge 1: devkit feature files and a built-in chunked evaluator.

Layout (the embedded glyph set and real data alike)::

    ROOT/facescrub_lst          probe images, one relative path per line (under facescrub_images/)
    ROOT/megaface_lst           distractors, one relative path per line (under megaface_images/)
    ROOT/facescrub_images/<identity>/<file>     identity of a probe = its parent folder name
    ROOT/megaface_images/<any path>
    ROOT/facescrub_noises.txt   optional: noisy probes, one entry per line ('#' lines ignored)
    ROOT/megaface_noises.txt    optional: noisy distractors

A noise entry matches a list entry with the same relative path or the same file name; matched
images are dropped before scoring (the "cleaned" MegaFace protocol). Features (--features) are
probe rows in facescrub_lst order followed by distractor rows in megaface_lst order.

Devkit feature files: ``<image path>_<algo>.bin`` = struct '4i' (n, 1, 4, 5) then n float32.

Evaluation (features L2-normalised): for every probe image i of an identity and every other
image j of it as the enrolled gallery image, rank-1 counts a hit when s(i, j) is above every
distractor score s(i, d); CMC rank r when fewer than r distractors score above s(i, j).
Verification: genuine = probe pairs of one identity, impostor = probe x distractor pairs;
TPR at FPR 1e-6 (largest TPR with FPR <= target). Distractors are streamed in blocks, so memory
is probes x block, not probes x distractors.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from facetrain.eval.embed import as_bgr_image, l2_normalize
from facetrain.eval.metrics import TopScores, tpr_at_fpr_split

FEATURE_HEADER = struct.Struct("4i")


def read_list(path: Path) -> List[str]:
    """Relative image paths, one per line (entry i is on line i + 1). A blank line or an entry
    listed twice is an error naming the line: a repeated probe would be scored twice (twice
    the weight in rank-1 and in the genuine pairs), a repeated distractor would count twice."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it should list one relative image path per "
                                "line")
    out: List[str] = []
    first: Dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            entry = line.strip()
            if not entry:
                raise ValueError(f"{path}:{lineno}: empty line; every line must be an image path")
            if entry in first:
                raise ValueError(f"{path}:{lineno}: {entry!r} is listed again (first on line "
                                 f"{first[entry]}); each image must be listed once, or it is "
                                 "counted twice. Remove the repeated line")
            first[entry] = lineno
            out.append(entry)
    if not out:
        raise ValueError(f"{path} is empty")
    return out


def read_noise(path: Path) -> set:
    if not path.is_file():
        return set()
    with open(path, "r", encoding="utf-8") as fh:
        return {ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")}


def keep_mask(entries: Sequence[str], noise: set) -> np.ndarray:
    """True for list entries not named (by path or file name) in the noise set."""
    return np.array([not (e in noise or Path(e).name in noise) for e in entries], dtype=bool)


def probe_identities(entries: Sequence[str], path: Path) -> np.ndarray:
    """Identity index per probe (parent folder name); entries without a folder are an error."""
    names = []
    for lineno, e in enumerate(entries, 1):
        parent = Path(e).parent.name
        if not parent:
            raise ValueError(f"{path}:{lineno}: {e!r} has no identity folder; FaceScrub entries "
                             "must look like <identity>/<file>")
        names.append(parent)
    _, ids = np.unique(np.array(names), return_inverse=True)
    return ids.astype(np.int64)


def write_feature_file(path: str | Path, feature: np.ndarray) -> None:
    """One devkit feature file: header (n, 1, 4, 5) then n little-endian float32."""
    f = np.asarray(feature, dtype="<f4").ravel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(FEATURE_HEADER.pack(f.size, 1, 4, 5))
        fh.write(f.tobytes())


def devkit_paths(out_dir: str | Path, entries: Sequence[str], algo: str,
                 list_path: str | Path) -> List[Path]:
    """`<out_dir>/<entry>_<algo>.bin` per entry of `list_path` (entry i on line i + 1), each
    checked to stay inside out_dir (facetrain.build.output.path_inside): check them all before a
    long extraction, so a bad entry stops the run before anything is written."""
    from facetrain.build.output import path_inside
    if "/" in algo or "\\" in algo or algo in ("", ".", ".."):
        raise ValueError(f"`algo` {algo!r}: the algorithm name goes into file names; use "
                         "letters, digits, '-' or '_'")
    return [path_inside(Path(out_dir), f"{e}_{algo}.bin", list_path, i + 1)
            for i, e in enumerate(entries)]


def write_devkit_features(out_dir: str | Path, entries: Sequence[str], features: np.ndarray,
                          algo: str, list_path: str | Path) -> int:
    """Write `<out_dir>/<entry>_<algo>.bin` for each entry of `list_path`; returns the count.
    Entries that would write outside out_dir are refused first (nothing is written then)."""
    if len(entries) != features.shape[0]:
        raise ValueError(f"{len(entries)} list entries but {features.shape[0]} feature rows")
    for path, f in zip(devkit_paths(out_dir, entries, algo, list_path), features):
        write_feature_file(path, f)
    return len(entries)


def evaluate(probes: np.ndarray, probe_ids: np.ndarray, distractors: np.ndarray,
             n_distractors: Optional[int] = None, ranks: Sequence[int] = (1, 5, 10),
             fprs: Sequence[float] = (1e-6,), block: int = 16384, normalize: bool = True,
             device: torch.device | str = "cpu", fpr_rule: str = "le",
             tile_bytes: Optional[int] = None) -> Dict[str, object]:
    """Identification (CMC) and verification of probes[P, D] (identity probe_ids[P]) against the
    first `n_distractors` rows of distractors[M, D] (may be a np.memmap), streamed by block to
    `device` (a GPU turns the 3.6 TFLOP of a 1M-distractor run into seconds). fpr_rule: "le"
    or "nearest" (metrics.tpr_at_fpr_split); TPR at an unresolvable FPR is None. tile_bytes:
    optional size of probe-row tiles of each block's product (None: one product per block)."""
    m = distractors.shape[0] if n_distractors is None else int(n_distractors)
    if m > distractors.shape[0] or m < 1:
        raise ValueError(f"n_distractors={m} but {distractors.shape[0]} distractor features exist")
    device = torch.device(device)
    from facetrain.eval.checks import check_features
    check_features(np.asarray(probes), "MegaFace probe (FaceScrub) features")
    if distractors.ndim != 2 or distractors.shape[1] != probes.shape[1]:
        raise ValueError(f"distractor features have shape {tuple(distractors.shape)}; expected "
                         f"[M, {probes.shape[1]}] like the probes")
    p = torch.from_numpy(l2_normalize(probes) if normalize else np.asarray(probes, np.float32))
    p = p.to(device)
    kmax = max(ranks)
    top = torch.full((p.shape[0], kmax), -float("inf"), device=device)  # best per probe
    k_neg = int(np.floor(max(fprs) * p.shape[0] * m * (1 + 1e-12))) + 1
    if fpr_rule == "nearest":                # the next reachable count lies past a tie run
        k_neg += 64
    neg_top = TopScores(k_neg)
    # Buffers reused across blocks: at 1M distractors a fresh [P, block] product per block is
    # 61 x 231 MB of new pages (reusing them: 16.6 -> 13.2 s at 250K distractors, one thread).
    # tile_bytes cuts the product into probe-row tiles of that size (each element's dot product
    # is unchanged). Off by default: on the 2-core dev machine 16 MB tiles were not faster.
    bl = min(block, m)
    n_p = p.shape[0]
    tile = n_p if tile_bytes is None else max(1, min(n_p, tile_bytes // (4 * bl)))
    stage = np.empty((bl, distractors.shape[1]), dtype=np.float32)
    prod = torch.empty(tile * bl, device=device)
    # a writable float32 array is read in place (normalised into the staging buffer)
    direct = (device.type == "cpu" and normalize and isinstance(distractors, np.ndarray)
              and not isinstance(distractors, np.memmap) and distractors.dtype == np.float32
              and distractors.flags.c_contiguous and distractors.flags.writeable)
    for s in range(0, m, block):
        n = min(s + block, m) - s
        if direct:
            src = torch.from_numpy(distractors[s:s + n])
        else:
            np.copyto(stage[:n], distractors[s:s + n], casting="unsafe")
            src = torch.from_numpy(stage[:n])
        if device.type == "cpu":
            # one pass gives both the norms and the finiteness check: a NaN/inf row has a
            # non-finite norm (the exact row check runs only then, and raises)
            norm = src.norm(dim=1, keepdim=True) if normalize else src.sum(1)
            if not bool(torch.isfinite(norm).all()):
                _check_finite_block(src, s)
            d = src
            if normalize:                               # torch: threaded, unlike numpy's norm
                d = torch.div(src, norm.clamp_min(1e-12), out=torch.from_numpy(stage[:n]))
        else:
            d = src
            _check_finite_block(d, s)
            d = d.to(device)
            if normalize:
                d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for i in range(0, n_p, tile):
            rows = min(tile, n_p - i)
            sc = torch.mm(p[i:i + rows], d.T, out=prod[:rows * n].view(rows, n))
            groups = _grouped(sc)                               # [rows, n_groups, GROUP]
            gmax = groups.amax(2)                               # [rows, n_groups]
            top[i:i + rows] = _row_topk(top[i:i + rows], groups, gmax, kmax)
            _add_top_negatives(neg_top, groups, gmax)
    return _score(p.cpu(), probe_ids, top.cpu().numpy(), neg_top, m, ranks, fprs, fpr_rule)


GROUP = 64


def _check_finite_block(d: torch.Tensor, start: int) -> None:
    """NaN/inf distractor rows would silently drop out of the impostor scores (NaN compares
    false) and surface later as a misleading 'only 0 scores were kept': name them here."""
    bad = ~torch.isfinite(d).all(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(1)
        raise ValueError(f"MegaFace distractor features: {rows.numel()} rows in this block hold "
                         f"NaN or inf (first: distractor row {start + int(rows[0])}); "
                         "re-extract the features")


def _grouped(sc: torch.Tensor) -> torch.Tensor:
    """[P, B] -> [P, ceil(B / GROUP), GROUP], padded with -inf.

    Why groups: the k largest values of a row lie in the k groups with the largest maxima, so
    one max-reduction plus small top-k calls replace a full top-k or a threshold mask over the
    whole [P, B] block (each of those costs about as much as the matrix product here)."""
    pad = (-sc.shape[1]) % GROUP
    if pad:
        sc = torch.nn.functional.pad(sc, (0, pad), value=-float("inf"))
    return sc.view(sc.shape[0], -1, GROUP)


def _row_topk(top: torch.Tensor, groups: torch.Tensor, gmax: torch.Tensor, k: int
              ) -> torch.Tensor:
    """Merge each row's k best of this block into `top` [P, k] (kept sorted, decreasing).
    Only rows with a group max above their current k-th best can change (a value not above it
    cannot displace anything, and an equal one leaves the same values), so after the first
    blocks only those few rows are merged."""
    live = torch.nonzero((gmax > top[:, -1:]).any(1)).squeeze(1)
    if live.numel() == 0:
        return top
    if live.numel() == top.shape[0]:
        return _merge_topk(top, groups, gmax, k)
    kg = min(k, gmax.shape[1])
    gi = torch.topk(gmax[live], kg, dim=1).indices                # [L, kg]
    cand = groups[live.unsqueeze(1), gi].flatten(1)             # only those groups, no copy
    out = top.clone()
    out[live] = torch.topk(torch.cat([top[live], cand], 1), k, dim=1).values
    return out


def _merge_topk(top: torch.Tensor, groups: torch.Tensor, gmax: torch.Tensor, k: int
                ) -> torch.Tensor:
    kg = min(k, gmax.shape[1])
    gi = torch.topk(gmax, kg, dim=1).indices                    # [P, kg]
    cand = groups.gather(1, gi.unsqueeze(2).expand(-1, -1, GROUP)).flatten(1)
    return torch.topk(torch.cat([top, cand], 1), k, dim=1).values


def _add_top_negatives(neg_top: TopScores, groups: torch.Tensor, gmax: torch.Tensor) -> None:
    """Feed the block's candidates for the global k largest impostor scores to `neg_top`:
    only groups whose max reaches both the block's k-th largest group max (a lower bound of
    its k-th largest value) and the current global k-th value can contribute."""
    flat = gmax.flatten()
    if neg_top.values.size >= neg_top.k:       # full: the global k-th value is the bar
        thr = float(neg_top.values.min())
    elif neg_top.k < flat.numel():
        thr = float(torch.topk(flat, neg_top.k).values[-1])
    else:
        thr = -float("inf")
    sel = torch.nonzero(flat >= thr).squeeze(1)
    vals = groups.flatten(0, 1)[sel].flatten()
    neg_top.add(vals[(vals >= thr) & (vals > -float("inf"))].cpu().numpy())


def _score(p: torch.Tensor, probe_ids: np.ndarray, top: np.ndarray, neg_top: TopScores, m: int,
           ranks: Sequence[int], fprs: Sequence[float], fpr_rule: str) -> Dict[str, object]:
    pp = (p @ p.T).numpy()                                      # probe x probe, [P, P]
    same = probe_ids[:, None] == probe_ids[None, :]
    np.fill_diagonal(same, False)
    qi, gj = np.nonzero(same)
    if qi.size == 0:
        raise ValueError("no identity has two probe images; MegaFace needs >= 2 per identity")
    genuine = pp[qi, gj]
    # distractors above the genuine score, counted within each probe's best max(ranks)
    above = (top[qi] > genuine[:, None]).sum(1)
    cmc = [float(np.mean(above < r)) for r in range(1, max(ranks) + 1)]
    out: Dict[str, object] = {f"rank{r}": cmc[r - 1] for r in ranks}
    iu = np.flatnonzero(qi < gj)                                # each genuine pair once
    out["tpr_at_fpr"] = tpr_at_fpr_split(genuine[iu], neg_top.values, fprs,
                                         n_neg=p.shape[0] * m, rule=fpr_rule)
    out["fpr_rule"] = fpr_rule
    out["impostor_pairs"] = int(p.shape[0] * m)
    out.update({"cmc": cmc, "probes": int(p.shape[0]), "identities": int(np.unique(probe_ids).size),
                "distractors": int(m), "probe_pairs": int(qi.size)})
    return out


def load_layout(root: str | Path, use_noise: bool = True
                ) -> Tuple[List[str], np.ndarray, List[str], np.ndarray, np.ndarray]:
    """-> (probe entries, probe identity ids, distractor entries, probe keep, distractor keep)."""
    root = Path(root)
    fs_path, mf_path = root / "facescrub_lst", root / "megaface_lst"
    probes, distractors = read_list(fs_path), read_list(mf_path)
    ids = probe_identities(probes, fs_path)
    keep_p = keep_mask(probes, read_noise(root / "facescrub_noises.txt") if use_noise else set())
    keep_d = keep_mask(distractors,
                       read_noise(root / "megaface_noises.txt") if use_noise else set())
    return probes, ids, distractors, keep_p, keep_d


class ListImages:
    """Dataset of decoded BGR images for list entries under `image_dir`; errors name the list
    file and line."""

    def __init__(self, image_dir: Path, entries: Sequence[str], list_path: Path) -> None:
        self.image_dir, self.entries, self.list_path = Path(image_dir), list(entries), list_path

    def __len__(self) -> int:
        return len(self.entries)

    def check_exist(self) -> None:
        """Fail before a long extraction when listed images are missing (first one named)."""
        missing = [i for i, e in enumerate(self.entries) if not (self.image_dir / e).is_file()]
        if missing:
            i = missing[0]
            raise FileNotFoundError(f"{self.image_dir / self.entries[i]} (line {i + 1} of "
                                    f"{self.list_path}) does not exist; {len(missing)} listed "
                                    "images are missing")

    def __getitem__(self, i: int) -> np.ndarray:
        path = self.image_dir / self.entries[i]
        where = f"{path} (line {i + 1} of {self.list_path})"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        return as_bgr_image(path.read_bytes(), where)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
