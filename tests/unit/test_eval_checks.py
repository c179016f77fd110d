"""Up-front input checks of the evaluators (facetrain.eval.checks) and the libraries' own guards:
NaN/inf, [N, 0] and wrongly shaped features, unreadable .npy files, unusable output paths."""
from __future__ import annotations

import os

import numpy as np
import pytest

from facetrain.eval import checks, megaface, reid


def test_check_features_names_the_problem():
    good = np.ones((4, 3), np.float32)
    checks.check_features(good, "f.npy", 4)
    with pytest.raises(ValueError, match=r"f.npy: features must be a 2-D array.*\(4,\)"):
        checks.check_features(np.ones(4), "f.npy")
    with pytest.raises(ValueError, match=r"shape \(4, 0\), zero values per row"):
        checks.check_features(np.ones((4, 0)), "f.npy")
    with pytest.raises(ValueError, match="4 feature rows but the list lists 5"):
        checks.check_features(good, "f.npy", 5, "the list")
    bad = good.copy()
    bad[2, 1], bad[3, 0] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"2 of 4 feature rows hold NaN or inf \(first: row 2\)"):
        checks.check_features(bad, "f.npy")
    huge = np.full((3, 4), 3e38, np.float32)                    # finite; the row sums overflow
    checks.check_features(huge, "f.npy", 3)
    huge[1, 2] = -np.inf
    with pytest.raises(ValueError, match=r"1 of 3 feature rows hold NaN or inf \(first: row 1\)"):
        checks.check_features(huge, "f.npy")
    checks.check_features(np.arange(12).reshape(4, 3), "f.npy", 4)     # integers


def test_load_feature_file_errors(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        checks.load_feature_file(tmp_path / "e.npy")
    np.save(tmp_path / "t.npy", np.ones((100, 4), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:200])                # truncated
    with pytest.raises(ValueError, match="t.npy is not a readable .npy array"):
        checks.load_feature_file(tmp_path / "t.npy")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        checks.load_feature_file(tmp_path)


def test_check_output_path(tmp_path):
    assert checks.check_output_path(tmp_path / "new/sub/r.json", "--json") == \
        tmp_path / "new/sub/r.json"
    with pytest.raises(ValueError, match="is a directory; pass a file path such as"):
        checks.check_output_path(tmp_path, "--json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        checks.check_output_path(tmp_path / "file" / "r.json", "--json")
    if os.geteuid() != 0:                                       # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match="not writable"):
            checks.check_output_path(ro / "r.json", "--json")


def test_megaface_nan_distractor_names_the_real_cause():
    rng = np.random.default_rng(0)
    probes = rng.normal(size=(6, 8)).astype(np.float32)
    ids = np.repeat(np.arange(3), 2)
    dis = rng.normal(size=(40, 8)).astype(np.float32)
    dis[33] = np.nan
    with pytest.raises(ValueError, match="distractor row 33"):
        megaface.evaluate(probes, ids, dis, block=16)
    probes[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"probe \(FaceScrub\) features: 1 of 6"):
        megaface.evaluate(probes, ids, dis)


def test_reid_nan_features_fail():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    g[4, 2] = np.nan
    with pytest.raises(ValueError, match="gallery features: 1 of 5 feature rows hold NaN"):
        reid.evaluate(q, np.arange(3), np.zeros(3, int), g, np.arange(5) % 3, np.ones(5, int))
