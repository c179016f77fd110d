"""IJB-C: meta parsing and its errors, alignment, pooling vs a naive loop, chunked pair scores vs
brute force, the whole 1:1 report vs sklearn, and 1:N vs a brute-force loop."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc

from facetrain.eval import ijbc, ijbc_1n

from test_eval_builders import make_ijbc, subject_features


def _naive_templates(feats, tids, mids, faceness=None, norm=False):
    """InsightFace-style loops: per template, per media mean, sum, normalise."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True) if norm else feats.copy()
    if faceness is not None:
        f = f * faceness[:, None]
    out = {}
    for t in np.unique(tids):
        ms = [f[(tids == t) & (mids == m)].mean(0) for m in np.unique(mids[tids == t])]
        v = np.sum(ms, 0)
        out[t] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("faceness,norm", [(False, False), (True, False), (True, True)])
def test_pool_templates_matches_loops(tmp_path, faceness, norm):
    rng = np.random.default_rng(0)
    info = make_ijbc(tmp_path, rng)
    feats = subject_features(rng, info["subjects"]) * rng.uniform(0.5, 2, (len(info["tids"]), 1))
    fs = info["faceness"] if faceness else None
    t_ids, tf = ijbc.pool_templates(feats.astype(np.float32), info["tids"], info["mids"], fs,
                                    norm, chunk=5)
    ref = _naive_templates(feats, info["tids"], info["mids"], fs, norm)
    assert list(t_ids) == sorted(ref)
    np.testing.assert_allclose(tf, np.stack([ref[t] for t in t_ids]), atol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
def test_score_pairs_matches_brute_force(dense):
    rng = np.random.default_rng(1)
    t = rng.normal(size=(50, 8)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    n_pairs = 2000 if dense else 20
    r1 = rng.integers(0, 25, n_pairs)
    r2 = rng.integers(20, 50, n_pairs)
    ref = [t[a] @ t[b] for a, b in zip(r1, r2)]
    for block_bytes in (7 * 30 * 4, 2**20):                      # 7-row blocks, one block
        got = ijbc.score_pairs(t, r1, r2, block_bytes=block_bytes)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_verify_features_matches_sklearn(tmp_path):
    rng = np.random.default_rng(2)
    info = make_ijbc(tmp_path, rng, n_subjects=8)
    meta = ijbc.read_meta(tmp_path)
    feats = subject_features(rng, info["subjects"], noise=1.5)
    res = ijbc.verify_features(meta, feats, use_faceness=True)
    ref = _naive_templates(feats, info["tids"], info["mids"], info["faceness"])
    p = info["pairs"]
    scores = np.array([ref[a] @ ref[b] for a, b, _ in p])
    fpr, tpr, _ = sk_roc(p[:, 2], scores)
    n_neg = len(p) - int(p[:, 2].sum())
    for key, val in res["tpr_at_fpr"].items():
        if float(key) * n_neg < 1:                 # too few impostor pairs to measure it
            assert val is None, key
        else:
            assert val == pytest.approx(tpr[fpr <= float(key)].max()), key
    assert None in res["tpr_at_fpr"].values() and res["fpr_rule"] == "le"
    assert res["pairs"] == len(p) and res["genuine_pairs"] == int(p[:, 2].sum())
    with pytest.raises(ValueError, match="lists"):
        ijbc.verify_features(meta, feats[:-1])


def _corrupt_line(path, lineno, new):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_meta_errors_name_file_and_line(tmp_path):
    make_ijbc(tmp_path, np.random.default_rng(3))
    lmk = tmp_path / "meta" / "ijbc_name_5pts_score.txt"
    good = lmk.read_text()
    _corrupt_line(lmk, 4, "4.jpg 1 2 3 4 5 6 7 8 9 0.9")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt:4: expected 12 fields"):
        ijbc.read_meta(tmp_path)
    lmk.write_text(good)
    _corrupt_line(lmk, 2, "other.jpg " + " ".join(["1"] * 11))
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt:2: image 'other\.jpg'"):
        ijbc.read_meta(tmp_path)
    lmk.write_text(good)
    pairs = tmp_path / "meta" / "ijbc_template_pair_label.txt"
    _corrupt_line(pairs, 3, "100 107 x")
    with pytest.raises(ValueError, match=r"template_pair_label\.txt:3: field label='x'"):
        ijbc.read_meta(tmp_path)
    _corrupt_line(pairs, 3, "100 99999 0")
    meta = ijbc.read_meta(tmp_path)
    with pytest.raises(ValueError, match="pair entry 3 uses template 99999"):
        ijbc.verify_features(meta, np.ones((len(meta.names), 4), np.float32))
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ijbc_face_tid_mid\.txt is missing"):
        ijbc.read_meta(tmp_path)


def test_an_image_listed_twice_is_refused(tmp_path):
    """Listed twice (here in another template too), an image would enter the template means
    twice: refused with both lines, also when the landmark file repeats it the same way."""
    make_ijbc(tmp_path, np.random.default_rng(3))
    for kind in ("face_tid_mid", "name_5pts_score"):
        f = tmp_path / "meta" / f"ijbc_{kind}.txt"
        lines = f.read_text().splitlines()
        name = lines[1].split()[0]
        lines[5] = name + " " + lines[5].split(maxsplit=1)[1]
        f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        ijbc.read_meta(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'meta' / 'ijbc_face_tid_mid.txt'}:6: image {name!r} is listed again "
        "(first on line 2); each face crop must be listed once, or it is counted twice. Remove "
        "the repeated line (and its line in name_5pts_score.txt)")


def test_align_face_inverts_a_known_similarity():
    rng = np.random.default_rng(4)
    img = np.zeros((112, 112, 3), np.uint8)
    for x, y in ijbc.ARCFACE_TEMPLATE_112:                      # bright dots at the template
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    ang, scale, shift = 0.3, 1.7, np.array([40.0, 25.0])
    m = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    big = cv2.warpAffine(img, np.c_[m, shift], (300, 300))
    pts = ijbc.ARCFACE_TEMPLATE_112 @ m.T + shift + rng.normal(scale=0.05, size=(5, 2))
    back = ijbc.align_face(big, pts, 112)
    assert back.shape == (112, 112, 3)
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 6
    assert ijbc.align_face(big, pts, 224).shape == (224, 224, 3)


def test_aligned_images_error_names_image_and_line(tmp_path):
    make_ijbc(tmp_path, np.random.default_rng(5), with_images=True)
    meta = ijbc.read_meta(tmp_path)
    ds = ijbc.AlignedImages(meta)
    assert ds[0].shape == (112, 112, 3)
    (tmp_path / "loose_crop" / meta.names[2]).write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"3\.jpg \(line 3 of .*name_5pts_score\.txt\)"):
        ds[2]


def test_identify_matches_brute_force():
    rng = np.random.default_rng(6)
    g_sid = np.arange(10)
    p_sid = rng.integers(0, 15, 60)                             # ids >= 10 are non-mated
    gal = subject_features(rng, g_sid, noise=0.5)
    probe = subject_features(np.random.default_rng(6), p_sid, noise=1.0)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)   # noqa: E731
    gal, probe = norm(gal), norm(probe)
    res = ijbc_1n.identify(probe, p_sid, gal, g_sid, ranks=(1, 5), fpirs=(0.1, 0.5), block=7)
    s = probe @ gal.T
    mated = np.isin(p_sid, g_sid)
    ranks = [np.sum(s[i] > s[i, p_sid[i]]) for i in np.flatnonzero(mated)]
    assert res["rank1"] == pytest.approx(np.mean(np.array(ranks) < 1))
    assert res["rank5"] == pytest.approx(np.mean(np.array(ranks) < 5))
    nm_top = np.sort(s[~mated].max(1))[::-1]
    for f in (0.1, 0.5):
        k = int(np.floor(f * nm_top.size))
        thr = nm_top[k]
        hits = [s[i].argmax() == p_sid[i] and s[i].max() > thr for i in np.flatnonzero(mated)]
        assert res["tpir_at_fpir"][f"{f:.0e}"] == pytest.approx(np.mean(hits))


def test_identify_templates_reads_csvs(tmp_path):
    rng = np.random.default_rng(7)
    info = make_ijbc(tmp_path, rng, n_subjects=6, with_1n=True)
    meta = ijbc.read_meta(tmp_path)
    t_ids, tf = ijbc.pool_templates(subject_features(rng, info["subjects"], noise=0.1),
                                    meta.tids, meta.mids)
    assert ijbc_1n.missing_1n(tmp_path, "ijbc") == []
    res = ijbc_1n.identify_templates(tmp_path, "ijbc", t_ids, tf)
    assert res["G1"]["rank1"] == 1.0 and res["G2"]["rank1"] == 1.0     # tiny noise: perfect
    assert res["G1"]["mated_probes"] + res["G1"]["nonmated_probes"] == 12
    csv = tmp_path / "meta" / "ijbc_1N_gallery_G1.csv"
    csv.write_text(csv.read_text() + "100,5,x.jpg\n")
    with pytest.raises(ValueError, match=r"G1\.csv:\d+: template 100 has subject 5"):
        ijbc_1n.identify_templates(tmp_path, "ijbc", t_ids, tf)


def test_fast_reader_equals_the_line_reader_and_defers_every_error(tmp_path, monkeypatch):
    """read_meta's numpy path gives the same arrays as the line-by-line reader (blank lines,
    tabs, CRLF included), and on a bad line it defers to that reader's message (file:line)."""
    make_ijbc(tmp_path, np.random.default_rng(4))
    pairs = tmp_path / "meta" / "ijbc_template_pair_label.txt"
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:3]) + "\n\n  \n" + "\r\n".join(
        ln.replace(" ", "\t", 1) for ln in lines[3:]) + "\n")
    fast = ijbc.read_meta(tmp_path)
    assert ijbc._read_meta_fast(tmp_path, "ijbc", True) is not None
    with monkeypatch.context() as m:
        m.setattr(ijbc, "_read_meta_fast", lambda *a: None)
        slow = ijbc.read_meta(tmp_path)
    for f in ("names", "tids", "mids", "landmarks", "faceness", "pair_t1", "pair_t2",
              "pair_label"):
        a, b = np.asarray(getattr(fast, f)), np.asarray(getattr(slow, f))
        assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), f
    assert fast.pair_label.dtype == bool and fast.pair_t1.size == len(lines)
    _corrupt_line(pairs, 2, "100 107 2")                # a label the numbers parse but is wrong
    with pytest.raises(ValueError, match=r"template_pair_label\.txt:2: label must be 0 or 1; "
                                         "got 2"):
        ijbc.read_meta(tmp_path)
    _corrupt_line(pairs, 2, "100 107 1 1")
    with pytest.raises(ValueError, match=r"template_pair_label\.txt:2: expected 3 fields"):
        ijbc.read_meta(tmp_path)
    pairs.write_text("\n \n")
    with pytest.raises(ValueError, match=r"template_pair_label\.txt is empty"):
        ijbc.read_meta(tmp_path)


def _full_roc_points(labels, scores):
    """Independent full ROC (one point per distinct score, (0, 0) first) from sklearn."""
    fpr, tpr, _ = sk_roc(labels, scores, drop_intermediate=False)
    return fpr, tpr


@pytest.mark.parametrize("levels", [7, 50, 0])
def test_roc_corners_are_the_full_roc_polyline(levels):
    """The corner ROC keeps only points of the full ROC, drops only inner points of horizontal
    runs, and gives the full ROC's TPR at every FPR ("le"), with heavy score ties (levels) and
    without (0)."""
    from facetrain.eval.metrics import tpr_at_fpr_from_roc
    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.2
    scores = rng.normal(size=3000) + 1.2 * labels
    if levels:
        scores = np.round(scores * levels / 4) / levels
    scores = scores.astype(np.float32)
    f_all, t_all = _full_roc_points(labels, scores)
    fpr, tpr = ijbc.roc_from_sorted(np.sort(scores[labels]), np.sort(scores[~labels]))
    full = {(a, b): i for i, (a, b) in enumerate(zip(f_all, t_all))}
    kept = [full[(a, b)] for a, b in zip(fpr, tpr)]                # every corner is a full point
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == f_all.size - 1
    dropped = np.setdiff1d(np.arange(f_all.size), kept)
    assert np.all(t_all[dropped] == t_all[dropped - 1])            # horizontal: same TPR ...
    assert np.all(t_all[dropped] == t_all[np.minimum(dropped + 1, f_all.size - 1)])
    targets = np.r_[np.unique(f_all), 1e-4, 3e-3, 0.05, 0.5]
    n_neg = int((~labels).sum())
    assert (tpr_at_fpr_from_roc(fpr, tpr, targets, n_neg)
            == tpr_at_fpr_from_roc(f_all, t_all, targets, n_neg))


@pytest.mark.parametrize("rule", ["le", "nearest"])
def test_verify_features_equals_the_one_point_per_score_roc(tmp_path, rule):
    """verify_features (sorted impostors, corner ROC) reports exactly what the full ROC of all
    pair scores reports, with many tied scores (features on a coarse grid)."""
    from facetrain.eval.metrics import roc_curve, tpr_at_fpr_from_roc
    rng = np.random.default_rng(6)
    make_ijbc(tmp_path, rng, n_subjects=14, templates_per=4)
    meta = ijbc.read_meta(tmp_path)
    feats = np.round(subject_features(rng, info_subjects(meta, rng), noise=2.0) * 2) / 2
    res = ijbc.verify_features(meta, feats.astype(np.float32), fpr_rule=rule)
    t_ids, tf = res["template_ids"], res["template_features"]
    r1 = np.searchsorted(t_ids, meta.pair_t1)
    r2 = np.searchsorted(t_ids, meta.pair_t2)
    scores = ijbc.score_pairs(tf, r1, r2)          # the pair scores (tested above)
    np.testing.assert_allclose(scores, np.einsum("ij,ij->i", tf[r1], tf[r2]), atol=1e-5)
    fpr, tpr, _ = roc_curve(meta.pair_label, scores)
    n_neg = int((~meta.pair_label).sum())
    assert res["tpr_at_fpr"] == tpr_at_fpr_from_roc(fpr, tpr, n_neg=n_neg, rule=rule)
    targets = np.unique(fpr)
    assert (tpr_at_fpr_from_roc(*res["roc"], targets, rule="le")
            == tpr_at_fpr_from_roc(fpr, tpr, targets, rule="le"))


def info_subjects(meta, rng):
    """One subject per 4 consecutive templates (make_ijbc's layout), per image."""
    t_rank = np.unique(meta.tids, return_inverse=True)[1]
    return t_rank // 4


def test_pool_templates_same_bits_for_every_input_kind(tmp_path):
    """A writable float32 array (used in place), a read-only memmap, float64 input and any chunk
    size give bit-identical templates."""
    rng = np.random.default_rng(7)
    info = make_ijbc(tmp_path, rng, n_subjects=10)
    feats = subject_features(rng, info["subjects"]).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    ref = ijbc.pool_templates(feats, info["tids"], info["mids"], info["faceness"])[1]
    for x, chunk in ((mm, 4096), (mm, 3), (feats, 1), (feats.astype(np.float64), 5)):
        got = ijbc.pool_templates(x, info["tids"], info["mids"], info["faceness"], chunk=chunk)
        np.testing.assert_array_equal(got[1], ref)


def test_template_positions_equal_rows_then_compact_and_same_error():
    t_ids = np.array([3, 8, 9, 40, 41])
    q = np.array([40, 3, 3, 9, 41, 40])
    got = ijbc._template_positions(t_ids, q, "pairs")
    ref = ijbc._compact(ijbc.template_rows(t_ids, q, "pairs"), t_ids.size)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    for bad in (7, -1, 42, 2**40):
        with pytest.raises(ValueError, match=f"pairs entry 3 uses template {bad},"):
            ijbc._template_positions(t_ids, np.array([3, 8, bad, 9]), "pairs")


def test_skip_landmarks_leaves_the_landmark_file_unread(tmp_path):
    make_ijbc(tmp_path, np.random.default_rng(8))
    _corrupt_line(tmp_path / "meta" / "ijbc_name_5pts_score.txt", 2, "broken")
    meta = ijbc.read_meta(tmp_path, need_landmarks=False, skip_landmarks=True)
    assert meta.landmarks is None and meta.faceness is None and len(meta.names) > 2
    with pytest.raises(ValueError, match=r"name_5pts_score\.txt:2: expected 12 fields"):
        ijbc.read_meta(tmp_path, need_landmarks=False)
    with pytest.raises(ValueError, match=r"name_5pts_score\.txt:2: expected 12 fields"):
        ijbc.read_meta(tmp_path, need_landmarks=True, skip_landmarks=True)


@pytest.mark.parametrize("case", ["fused", "sparse", "blocks", "negative ids", "huge ids"])
def test_pair_scores_equal_the_equation_and_the_old_path(case, monkeypatch):
    """_pair_scores on every path: the cosine of the two templates (float64 reference), and bit
    for bit what the code before it gave (template_rows, _compact, _score_compact)."""
    rng = np.random.default_rng(9)
    n_t = 2000 if case == "sparse" else 60
    t_ids = np.sort(rng.choice(5000, n_t, replace=False)).astype(np.int64)
    if case == "negative ids":
        t_ids -= 500
    elif case == "huge ids":
        t_ids += 2**40
    tf = rng.normal(size=(n_t, 8)).astype(np.float32)
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    n_pairs = 3000
    r1, r2 = rng.integers(0, n_t // 2, n_pairs), rng.integers(n_t // 3, n_t, n_pairs)
    if case == "sparse":                               # the product would cost > 64 per pair
        assert np.unique(r1).size * np.unique(r2).size > ijbc._DENSE * n_pairs
    block = 7 * 35 * 4 if case == "blocks" else 512 * 2**20
    if case == "fused":                                # IJB-C's path: not via _score_compact
        monkeypatch.setattr(ijbc, "_score_compact", None)
    got = ijbc._pair_scores(tf, t_ids, t_ids[r1], t_ids[r2], "pairs", block)
    ref = np.einsum("ij,ij->i", tf[r1].astype(np.float64), tf[r2].astype(np.float64))
    np.testing.assert_allclose(got, ref, atol=1e-6)
    monkeypatch.undo()
    old = ijbc._score_compact(tf, *ijbc._compact(ijbc.template_rows(t_ids, t_ids[r1], "p"), n_t),
                              *ijbc._compact(ijbc.template_rows(t_ids, t_ids[r2], "p"), n_t),
                              block)
    assert got.dtype == np.float32 and np.array_equal(got, old)
    if case == "sparse":                               # 1,024-pair chunks: the bits of one chunk
        import torch
        t = torch.from_numpy(tf)
        one = (t[torch.from_numpy(r1)] * t[torch.from_numpy(r2)]).sum(1).numpy()
        assert np.array_equal(got, one)


def test_pair_scores_name_the_first_unknown_template():
    t_ids = np.array([3, 8, 9, 40, 41])
    tf = np.eye(5, dtype=np.float32)
    for bad in (7, -1, 42, 2**40):
        for col in (0, 1):
            q = [np.array([3, 8, 9, 41]), np.array([40, 3, 9, 8])]
            q[col] = q[col].copy()
            q[col][2] = bad
            with pytest.raises(ValueError, match=f"pairs entry 3 uses template {bad},"):
                ijbc._pair_scores(tf, t_ids, q[0], q[1], "pairs")

