"""Verification packs: reading, pair scores, 10-fold protocol, bad packs."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc

from facetrain.eval import verification
from facetrain.eval.metrics import verification_kfold

from test_eval_builders import make_pack, subject_features


def test_load_pack_round_trip(tmp_path):
    issame = make_pack(tmp_path / "lfw.bin", 6, np.random.default_rng(0))
    bins, same = verification.load_pack(tmp_path / "lfw.bin")
    assert len(bins) == 12 and isinstance(bins[0], bytes)
    np.testing.assert_array_equal(same, issame)


def test_pack_errors_name_the_file(tmp_path):
    with open(tmp_path / "odd.bin", "wb") as fh:
        pickle.dump(([b"a", b"b", b"c"], [True, False]), fh)
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images but 2 pairs"):
        verification.load_pack(tmp_path / "odd.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable pickle"):
        verification.load_pack(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        verification.load_pack(tmp_path / "missing.bin")


def test_pack_images_name_the_bad_image(tmp_path):
    ds = verification.PackImages([b"x", b"y"], tmp_path / "lfw.bin")
    with pytest.raises(ValueError, match=r"lfw\.bin: image 1 \(pair 0\)"):
        ds[1]


def test_evaluate_against_reference():
    rng = np.random.default_rng(1)
    n = 300
    issame = rng.random(n) < 0.5
    subj = np.empty(2 * n, dtype=np.int64)
    subj[0::2] = np.arange(n)
    subj[1::2] = np.where(issame, np.arange(n), np.arange(n) + n)
    feats = subject_features(rng, subj, dim=8, noise=1.0) * rng.uniform(0.5, 3, (2 * n, 1))
    res = verification.evaluate_pack_features(feats.astype(np.float32), issame,
                                              fprs=(1e-3, 1e-1))
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = np.array([f[2 * i] @ f[2 * i + 1] for i in range(n)])
    ref = verification_kfold(cos, issame)
    assert res["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])
    assert 0.6 < res["accuracy_mean"] <= 1.0
    fpr, tpr, _ = sk_roc(issame, cos)
    assert res["tpr_at_fpr"]["1e-01"] == pytest.approx(tpr[fpr <= 1e-1].max())
    assert res["tpr_at_fpr"]["1e-03"] is None           # ~150 impostor pairs cannot resolve it
    with pytest.raises(ValueError, match="expected 600 rows"):
        verification.evaluate_pack_features(feats[:10], issame)
