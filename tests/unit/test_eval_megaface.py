"""MegaFace: devkit feature file bytes, lists/noise, and the streamed evaluator vs brute force."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from facetrain.eval import megaface

from test_eval_builders import make_megaface, subject_features


def read_feature_file(path) -> np.ndarray:
    """The devkit's feature file, read from its layout: int32 n, 1, 4, 5, then n float32."""
    data = Path(path).read_bytes()
    n, a, b, c = struct.unpack_from("<4i", data)
    assert (a, b, c) == (1, 4, 5) and len(data) == 16 + 4 * n, f"{path}: bad header or size"
    return np.frombuffer(data, dtype="<f4", offset=16).copy()


def test_feature_file_bytes_exact(tmp_path):
    f = np.array([0.5, -1.25, 3.0], dtype=np.float64)
    megaface.write_feature_file(tmp_path / "a" / "x.jpg_algo.bin", f)
    data = (tmp_path / "a" / "x.jpg_algo.bin").read_bytes()
    assert data == struct.pack("4i", 3, 1, 4, 5) + struct.pack("<3f", 0.5, -1.25, 3.0)
    np.testing.assert_array_equal(read_feature_file(tmp_path / "a" / "x.jpg_algo.bin"), f)


def test_devkit_files_follow_list_paths(tmp_path):
    entries = ["Al/Al_1.png", "Bo/Bo_2.png"]
    n = megaface.write_devkit_features(tmp_path, entries, np.eye(2, dtype=np.float32), "ft",
                                       tmp_path / "facescrub_lst")
    assert n == 2
    np.testing.assert_array_equal(read_feature_file(tmp_path / "Bo/Bo_2.png_ft.bin"),
                                  [0, 1])


@pytest.mark.parametrize("bad", ["../../escape.png", "A/../../escape.png", "/tmp/escape.png",
                                 "link/escape.png"])
def test_devkit_entries_never_write_outside_the_output_folder(tmp_path, bad):
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    outside.mkdir()
    (out / "facescrub").mkdir(parents=True)
    (out / "facescrub" / "link").symlink_to(outside)     # a symlink already in the folder
    entries = ["A/a.png", bad, "B/b.png"]
    with pytest.raises(ValueError) as info:
        megaface.write_devkit_features(out / "facescrub", entries,
                                       np.ones((3, 2), np.float32), "ft", "root/facescrub_lst")
    why = {"../../escape.png": "has a '..' component", "A/../../escape.png": "has a '..' "
           "component", "/tmp/escape.png": "is an absolute path",
           "link/escape.png": f"resolves to {outside.resolve() / 'escape.png_ft.bin'}, outside "
                              "it (through a symbolic link)"}[bad]
    assert str(info.value) == (
        f"root/facescrub_lst:2: entry '{bad}_ft.bin' {why}; output written under this name must "
        f"stay inside {out / 'facescrub'}. Use a path relative to it without '..'")
    # Checked before writing: not even the good first entry was written.
    assert [p.name for p in (out / "facescrub").rglob("*.bin")] == []
    assert not list(outside.iterdir()) and not (tmp_path / "escape.png_ft.bin").exists()
    # A symlinked output folder itself is fine (both sides are resolved).
    (tmp_path / "alias").symlink_to(out)
    megaface.write_devkit_features(tmp_path / "alias" / "facescrub", ["A/a.png"],
                                   np.ones((1, 2), np.float32), "ft", "root/facescrub_lst")
    assert (out / "facescrub" / "A" / "a.png_ft.bin").is_file()


def test_layout_identities_and_noise(tmp_path):
    info = make_megaface(tmp_path, np.random.default_rng(0))
    (tmp_path / "facescrub_noises.txt").write_text("# header\nPerson_1_2.png\n")
    (tmp_path / "megaface_noises.txt").write_text(info["distractors"][3] + "\n")
    probes, ids, dis, keep_p, keep_d = megaface.load_layout(tmp_path)
    np.testing.assert_array_equal(ids, info["ids"])
    assert (~keep_p).sum() == 1 and not keep_p[probes.index("Person_1/Person_1_2.png")]
    assert (~keep_d).sum() == 1 and not keep_d[3]
    _, _, _, keep_p, _ = megaface.load_layout(tmp_path, use_noise=False)
    assert keep_p.all()


def test_list_errors_name_file_and_line(tmp_path):
    (tmp_path / "facescrub_lst").write_text("A/a.png\nnofolder.png\n")
    with pytest.raises(ValueError, match=r"facescrub_lst:2: 'nofolder.png' has no identity"):
        megaface.probe_identities(megaface.read_list(tmp_path / "facescrub_lst"),
                                  tmp_path / "facescrub_lst")
    (tmp_path / "megaface_lst").write_text("a.png\n\nb.png\n")
    with pytest.raises(ValueError, match=r"megaface_lst:2: empty line"):
        megaface.read_list(tmp_path / "megaface_lst")
    # An image listed twice would be scored twice: refused, naming both lines.
    (tmp_path / "facescrub_lst").write_text("A/a.png\nA/b.png\nB/c.png\n A/b.png\n")
    with pytest.raises(ValueError, match=r"^\S*facescrub_lst:4: 'A/b.png' is listed again "
                                         r"\(first on line 2\); each image must be listed once"):
        megaface.load_layout(tmp_path)
    ds = megaface.ListImages(tmp_path / "megaface_images", ["a.png"], tmp_path / "megaface_lst")
    with pytest.raises(FileNotFoundError, match=r"a\.png \(line 1 of .*megaface_lst\)"):
        ds[0]


def _brute(probes, ids, dis, fpr):
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    p, d = n(probes.astype(np.float64)), n(dis.astype(np.float64))
    pd, pp = p @ d.T, p @ p.T
    hits = {1: [], 3: []}
    genuine = []
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j and ids[i] == ids[j]:
                above = np.sum(pd[i] > pp[i, j])
                for r in hits:
                    hits[r].append(above < r)
                if i < j:
                    genuine.append(pp[i, j])
    neg = np.sort(pd.ravel())[::-1]
    k = int(np.floor(fpr * neg.size))
    tpr = np.mean(np.array(genuine) > neg[k])
    return np.mean(hits[1]), np.mean(hits[3]), tpr


@pytest.mark.parametrize("block,tile_bytes", [(7, None), (130, 16 * 2**20),
                                              (1000, None), (130, 5 * 130 * 4),
                                              (7, 1)])
def test_evaluate_matches_brute_force(block, tile_bytes):
    """Any distractor block and probe-row tile (5 rows; 1 row) gives the brute-force numbers."""
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(6), 4)
    probes = subject_features(rng, ids, dim=8, noise=1.2)
    dis = rng.normal(size=(200, 8)).astype(np.float32)
    res = megaface.evaluate(probes, ids, dis, ranks=(1, 3), fprs=(1e-3,), block=block,
                            tile_bytes=tile_bytes)
    r1, r3, tpr = _brute(probes, ids, dis, 1e-3)
    assert res["rank1"] == pytest.approx(r1) and res["rank3"] == pytest.approx(r3)
    assert res["tpr_at_fpr"]["1e-03"] == pytest.approx(tpr)
    assert 0 < res["rank1"] < 1                                  # a non-trivial case
    sub = megaface.evaluate(probes, ids, dis, n_distractors=50, ranks=(1,), fprs=(1e-3,),
                            block=block, tile_bytes=tile_bytes)
    assert sub["distractors"] == 50
    assert sub["rank1"] == pytest.approx(_brute(probes, ids, dis[:50], 1e-3)[0])
    with pytest.raises(ValueError, match="n_distractors=500"):
        megaface.evaluate(probes, ids, dis, n_distractors=500)


def test_evaluate_same_result_for_tiles_memmaps_and_float64(tmp_path):
    """Probe-row tiles, a read-only memmap and float64 distractors change nothing, bit for bit
    (the staging buffer converts; each score is the same dot product)."""
    rng = np.random.default_rng(4)
    ids = np.repeat(np.arange(10), 5)
    probes = subject_features(rng, ids, dim=16, noise=1.4)
    dis = rng.normal(size=(3000, 16)).astype(np.float32)
    np.save(tmp_path / "d.npy", dis)
    ref = megaface.evaluate(probes, ids, dis, ranks=(1, 5), fprs=(1e-3, 1e-2), block=512)
    for kw in ({"tile_bytes": 7 * 512 * 4}, {"tile_bytes": 1, "block": 333}):
        assert megaface.evaluate(probes, ids, dis, ranks=(1, 5), fprs=(1e-3, 1e-2),
                                 **{"block": 512, **kw}) == ref
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    assert megaface.evaluate(probes, ids, mm, ranks=(1, 5), fprs=(1e-3, 1e-2), block=512) == ref
    d64 = megaface.evaluate(probes, ids, dis.astype(np.float64), ranks=(1, 5),
                            fprs=(1e-3, 1e-2), block=512)
    assert d64 == ref


@pytest.mark.gpu
def test_cuda_scoring_matches_cpu():
    rng = np.random.default_rng(2)
    ids = np.repeat(np.arange(8), 3)
    probes = subject_features(rng, ids, dim=16, noise=1.3)
    dis = rng.normal(size=(900, 16)).astype(np.float32)
    cpu = megaface.evaluate(probes, ids, dis, fprs=(1e-3,), block=250)
    gpu = megaface.evaluate(probes, ids, dis, fprs=(1e-3,), block=250, device="cuda")
    assert gpu["rank1"] == pytest.approx(cpu["rank1"], abs=0.02)
    assert gpu["tpr_at_fpr"]["1e-03"] == pytest.approx(cpu["tpr_at_fpr"]["1e-03"], abs=0.02)


@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_distractor_rows_are_named(normalize):
    """A NaN or inf distractor row stops the run naming it (the norms double as the check), and
    finite rows whose norm overflows float32 do not."""
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(3), 2)
    probes = subject_features(rng, ids, dim=4)
    dis = rng.normal(size=(40, 4)).astype(np.float32)
    dis[3, 0] = 3e38                                  # finite, its squared norm overflows
    megaface.evaluate(probes, ids, dis, fprs=(1e-2,), block=16, normalize=normalize)
    for bad in (np.nan, np.inf):
        d = dis.copy()
        d[21, 2] = bad
        with pytest.raises(ValueError, match=r"1 rows in this block hold NaN or inf \(first: "
                                             r"distractor row 21\)"):
            megaface.evaluate(probes, ids, d, fprs=(1e-2,), block=16, normalize=normalize)
