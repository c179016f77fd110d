"""Builders of tiny protocol folders in the exact public formats (used by the eval unit and CLI
tests), plus checks that the builders themselves write what the formats say."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict

import cv2
import numpy as np

from facetrain.eval.ijbc import ARCFACE_TEMPLATE_112


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def rand_image(rng: np.random.Generator, h: int = 16, w: int = 16) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def subject_features(rng: np.random.Generator, subjects: np.ndarray, dim: int = 16,
                     noise: float = 0.8) -> np.ndarray:
    """Rows = per-subject centre + noise: realistic-looking scores with known identities."""
    centres = rng.normal(size=(int(subjects.max()) + 1, dim))
    return (centres[subjects] + noise * rng.normal(size=(subjects.size, dim))).astype(np.float32)


def make_pack(path: Path, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    issame = rng.random(n_pairs) < 0.5
    bins = [png(rand_image(rng)) for _ in range(2 * n_pairs)]
    with open(path, "wb") as fh:
        pickle.dump((bins, issame.tolist()), fh, protocol=4)
    return issame


def make_ijbc(root: Path, rng: np.random.Generator, n_subjects: int = 6, templates_per: int = 3,
              with_images: bool = False, with_1n: bool = False, prefix: str = "ijbc"
              ) -> Dict[str, np.ndarray]:
    """IJB-C layout: loose_crop/, meta/{prefix}_face_tid_mid.txt, _name_5pts_score.txt,
    _template_pair_label.txt (all template pairs), optionally the 1:N CSVs."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    names, tids, mids, subj_img, t_subj = [], [], [], [], {}
    tid, mid, img_no = 100, 5000, 0
    for s in range(n_subjects):
        for _ in range(templates_per):
            t_subj[tid] = s
            for _m in range(int(rng.integers(1, 3))):
                for _i in range(int(rng.integers(1, 4))):
                    img_no += 1
                    names.append(f"{img_no}.jpg")
                    tids.append(tid)
                    mids.append(mid)
                    subj_img.append(s)
                mid += 1
            tid += 7
    with open(root / "meta" / f"{prefix}_face_tid_mid.txt", "w") as fh:
        fh.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, tids, mids))
    faceness = rng.uniform(0.5, 2.0, len(names)).astype(np.float32)
    with open(root / "meta" / f"{prefix}_name_5pts_score.txt", "w") as fh:
        for n, f in zip(names, faceness):
            pts = ARCFACE_TEMPLATE_112 * 0.5 + 4 + rng.normal(scale=0.5, size=(5, 2))
            fh.write(n + " " + " ".join(f"{v:.3f}" for v in pts.ravel()) + f" {f:.4f}\n")
            if with_images:
                cv2.imwrite(str(root / "loose_crop" / n), rand_image(rng, 64, 64))
    tlist = sorted(t_subj)
    pairs = [(a, b, int(t_subj[a] == t_subj[b]))
             for i, a in enumerate(tlist) for b in tlist[i + 1:]]
    with open(root / "meta" / f"{prefix}_template_pair_label.txt", "w") as fh:
        fh.writelines(f"{a} {b} {lab}\n" for a, b, lab in pairs)
    if with_1n:
        gal = {"G1": [t for t in tlist if t_subj[t] % 2 == 0][::templates_per],
               "G2": [t for t in tlist if t_subj[t] % 2 == 1][::templates_per]}
        enrolled = set(gal["G1"]) | set(gal["G2"])
        probe = [t for t in tlist if t not in enrolled]
        for part, ts in (("gallery_G1", gal["G1"]), ("gallery_G2", gal["G2"]),
                         ("probe_mixed", probe)):
            with open(root / "meta" / f"{prefix}_1N_{part}.csv", "w") as fh:
                fh.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
                fh.writelines(f"{t},{t_subj[t]},img/{t}.jpg\n" for t in ts)
    return {"tids": np.array(tids), "mids": np.array(mids), "faceness": faceness,
            "subjects": np.array(subj_img), "pairs": np.array(pairs)}


def make_megaface(root: Path, rng: np.random.Generator, n_ids: int = 5, per_id: int = 3,
                  n_distractors: int = 20, with_images: bool = False) -> Dict[str, object]:
    probes = [f"Person_{i}/Person_{i}_{j}.png" for i in range(n_ids) for j in range(per_id)]
    dis = [f"{k % 3}/{k}/img_{k}.png" for k in range(n_distractors)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "facescrub_lst").write_text("".join(p + "\n" for p in probes))
    (root / "megaface_lst").write_text("".join(d + "\n" for d in dis))
    if with_images:
        for sub, entries in (("facescrub_images", probes), ("megaface_images", dis)):
            for e in entries:
                (root / sub / e).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / sub / e), rand_image(rng))
    return {"probes": probes, "distractors": dis,
            "ids": np.repeat(np.arange(n_ids), per_id)}


def make_reid(root: Path, rng: np.random.Generator, n_ids: int = 6, n_cams: int = 3
              ) -> Dict[str, np.ndarray]:
    """Market-1501-style query/ and bounding_box_test/ (with a junk -1 and a 0000 distractor)."""
    out = {}
    for folder, per in (("query", 1), ("bounding_box_test", 3)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        names = []
        for pid in range(1, n_ids + 1):
            for cam in range(1, n_cams + 1):
                for k in range(per):
                    names.append(f"{pid:04d}_c{cam}s1_{k:06d}_01.jpg")
        if folder == "bounding_box_test":
            names += ["-1_c1s1_000000_00.jpg", "0000_c2s1_000000_00.jpg"]
        for n in names:
            cv2.imwrite(str(root / folder / n), rand_image(rng, 16, 8))
        out[folder] = np.array(sorted(names))
    return out


def test_pack_builder_writes_the_public_pickle_layout(tmp_path):
    rng = np.random.default_rng(0)
    issame = make_pack(tmp_path / "p.bin", 4, rng)
    bins, same = pickle.load(open(tmp_path / "p.bin", "rb"))
    assert len(bins) == 8 and same == issame.tolist()
    assert cv2.imdecode(np.frombuffer(bins[3], np.uint8), cv2.IMREAD_COLOR).shape == (16, 16, 3)


def test_ijbc_builder_meta_fields(tmp_path):
    make_ijbc(tmp_path, np.random.default_rng(0), with_1n=True)
    for name, n in (("face_tid_mid", 3), ("name_5pts_score", 12), ("template_pair_label", 3)):
        lines = (tmp_path / "meta" / f"ijbc_{name}.txt").read_text().splitlines()
        assert lines and all(len(ln.split()) == n for ln in lines)
