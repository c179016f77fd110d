"""Re-ID: file-name parsing and mAP/CMC with same-camera exclusion vs a brute-force loop."""
from __future__ import annotations

import numpy as np
import pytest

from facetrain.eval import reid

from test_eval_builders import make_reid


def _brute(qf, qp, qc, gf, gp, gc):
    """One query at a time, written the long way."""
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    aps, first = [], []
    for i in range(len(qf)):
        keep = [j for j in range(len(gf))
                if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])]
        sims = [(float(qf[i] @ gf[j]), j) for j in keep]
        sims.sort(key=lambda t: -t[0])
        matches = [gp[j] == qp[i] for _, j in sims]
        if not any(matches):
            continue
        hits, precs = 0, []
        for r, m in enumerate(matches, 1):
            if m:
                hits += 1
                precs.append(hits / r)
        aps.append(np.mean(precs))
        first.append(matches.index(True))
    first = np.array(first)
    return np.mean(aps), np.mean(first < 1), np.mean(first < 5)


def test_evaluate_matches_brute_force_with_exclusions():
    rng = np.random.default_rng(0)
    q_pids = rng.integers(1, 8, 40)
    q_cams = rng.integers(1, 4, 40)
    g_pids = np.r_[rng.integers(0, 8, 150), [-1, -1]]
    g_cams = rng.integers(1, 4, 152)
    centres = rng.normal(size=(9, 6))
    qf = (centres[q_pids] + 1.0 * rng.normal(size=(40, 6))).astype(np.float32)
    gf = (centres[g_pids] + 1.0 * rng.normal(size=(152, 6))).astype(np.float32)
    gf[-2:] = qf[:2] * 5                                        # junk identical to queries
    res = reid.evaluate(qf, q_pids, q_cams, gf, g_pids, g_cams, ranks=(1, 5), block=9)
    m_ap, r1, r5 = _brute(qf, q_pids, q_cams, gf, g_pids, g_cams)
    assert res["mAP"] == pytest.approx(m_ap)
    assert res["rank1"] == pytest.approx(r1) and res["rank5"] == pytest.approx(r5)


def test_same_camera_match_is_not_counted():
    qf = np.array([[1.0, 0.0]], np.float32)
    gf = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], np.float32)
    # gallery 0 is the same person on the same camera: excluded, so rank-1 is the other camera
    res = reid.evaluate(qf, np.array([1]), np.array([1]), gf, np.array([1, 2, 1]),
                        np.array([1, 1, 2]), ranks=(1,))
    assert res["rank1"] == 1.0 and res["mAP"] == 1.0


def test_parse_folder_and_bad_names(tmp_path):
    make_reid(tmp_path, np.random.default_rng(1), n_ids=2, n_cams=2)
    paths, pids, cams = reid.parse_folder(tmp_path / "bounding_box_test")
    assert len(paths) == 2 * 2 * 3 + 2
    assert pids.min() == -1 and set(cams) == {1, 2}
    (tmp_path / "query" / "oops.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"oops\.jpg: file name does not start"):
        reid.parse_folder(tmp_path / "query")
    with pytest.raises(FileNotFoundError, match="nothere"):
        reid.parse_folder(tmp_path / "nothere")
