"""The one 5-point alignment: the similarity fit against a float64 least-squares reference written
here, warps that put known dots on the template, the landmarks file, align_faces' report and
resume, the IJB-C evaluator using the same warp; and the dlib detector on a real photograph that
an installed package ships (matplotlib's Grace Hopper portrait), re-detected after warping."""
import csv
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest

from facetrain.build import align
from facetrain.build.align import ARCFACE_TEMPLATE_112, align_face, similarity_transform
from facetrain.build.align_folder import REPORT, align_folder
from facetrain.build.landmarks import read_landmarks_file
from facetrain.eval import ijbc
from test_data_tools import tool

T = ARCFACE_TEMPLATE_112.astype(np.float64)
PHOTO = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def reference_fit(src, dst):
    """Least squares over x' = a x - b y + tx, y' = b x + a y + ty (every rotation+scale, no
    reflection), solved by numpy's lstsq in float64."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_similarity_fit_matches_the_least_squares_reference():
    rng = np.random.default_rng(0)
    for trial in range(50):
        src = rng.normal(0, 50, (5, 2)) + 200
        if trial % 5 == 0:
            src[:, 0] = -src[:, 0]                      # mirrored points: no reflection allowed
        dst = T + rng.normal(0, 3, (5, 2))
        np.testing.assert_allclose(similarity_transform(src, dst), reference_fit(src, dst),
                                   rtol=1e-9, atol=1e-9)
    ang, s, t = 0.4, 2.5, np.array([30.0, -12.0])        # an exact transform is recovered
    m = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    np.testing.assert_allclose(similarity_transform(T, T @ m.T + t), np.c_[m, t], atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), T)


def _dots(points, shape, radius=2):
    img = np.zeros(shape + (3,), np.uint8)
    for x, y in points:
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), radius * 16, (255, 255, 255),
                   -1, lineType=cv2.LINE_AA, shift=4)
    return img


def _centroids(img, near, r=6):
    """Intensity centroid of the dot around each expected point."""
    g = img[..., 0].astype(np.float64) if img.ndim == 3 else img.astype(np.float64)
    out = []
    for x, y in near:
        x0, y0 = int(round(x)) - r, int(round(y)) - r
        w = g[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
        yy, xx = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def _random_pose(rng):
    ang, s = rng.uniform(-0.5, 0.5), rng.uniform(1.5, 2.5)
    m = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return m, rng.uniform(40, 80, 2)


def test_warp_puts_the_landmarks_on_the_template_and_ijbc_uses_it():
    rng = np.random.default_rng(1)
    for _ in range(5):
        m, t = _random_pose(rng)
        pts = T @ m.T + t
        photo = _dots(pts, (400, 400))
        for size in (112, 224):
            out = align_face(photo, pts + rng.normal(0, 0.05, (5, 2)), size)
            assert out.shape == (size, size, 3)
            want = T * size / 112
            np.testing.assert_allclose(_centroids(out, want), want, atol=0.15)
        np.testing.assert_array_equal(ijbc.align_face(photo, pts, 112), align_face(photo, pts))
    assert ijbc.ARCFACE_TEMPLATE_112 is align.ARCFACE_TEMPLATE_112


def test_landmarks_file(tmp_path):
    f = tmp_path / "lmk.txt"
    f.write_text("a/1.jpg 1 2 3 4 5 6 7 8 9 10\n\nb.png 1 2 3 4 5 6 7 8 9 10 0.98\n")
    got = read_landmarks_file(f)
    assert list(got) == ["a/1.jpg", "b.png"]
    np.testing.assert_array_equal(got["b.png"], np.arange(1, 11).reshape(5, 2))
    for text, msg in [("x 1 2 3\n", "line 1: expected `name x1 y1 ... x5 y5 [score]`"),
                      ("a 1 2 3 4 5 6 7 8 9 10\na 1 2 3 4 5 6 7 8 9 q\n",
                       "line 2: the ten coordinates must be numbers"),
                      ("a 1 2 3 4 5 6 7 8 9 10\n\na 1 2 3 4 5 6 7 8 9 10\n",
                       "line 3: a is listed twice")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=f"{f}, {msg}".replace("[", r"\[").replace(
                "]", r"\]").replace(".", r"\.")):
            read_landmarks_file(f)


def _report(out: Path):
    with open(out / REPORT, newline="") as fh:
        return {r["path"]: r["status"] for r in csv.DictReader(fh)}


def test_align_faces_with_a_landmarks_file_report_and_resume(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src, lines, poses = tmp_path / "photos", [], {}
    for name in ("ann/1.jpg", "ann/2.png", "bo/1.png", "bo/2.png"):
        m, t = _random_pose(rng)
        pts = T @ m.T + t
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / name), _dots(pts, (400, 400), radius=3))
        lines.append(name + "".join(f" {v:.3f}" for v in pts.ravel()))
    (src / "bo/broken.jpg").write_bytes(b"")
    lines.append("bo/broken.jpg" + " 1" * 10)
    lines.append("gone/x.jpg" + " 1" * 10)                     # names no image
    lines.remove(lines[3])                                     # bo/2.png: no landmarks
    (tmp_path / "lmk.txt").write_text("\n".join(lines) + "\n")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "aligned"
    main = tool("align_faces")
    assert main([str(src), str(out), "--landmarks", str(tmp_path / "lmk.txt"),
                 "--no-progress"]) == 0
    o, e = capsys.readouterr()
    assert "aligned 3, missing_image 1, no_landmarks 1, unreadable 1" in o
    assert "unreadable: bo/broken.jpg: empty file (0 bytes)" in e
    assert _report(out) == {"ann/1.jpg": "aligned", "ann/2.png": "aligned", "bo/1.png": "aligned",
                            "bo/2.png": "no_landmarks", "bo/broken.jpg": "unreadable",
                            "gone/x.jpg": "missing_image"}
    for name in ("ann/2.png", "bo/1.png"):                     # lossless: dots on the template
        img = cv2.imread(str(out / name))
        assert img.shape == (112, 112, 3)
        np.testing.assert_allclose(_centroids(img, T), T, atol=0.2)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not [p for p in out.rglob(".*")]                   # no temporary left
    # Resume: what exists is kept as it is, what is missing is aligned again.
    (out / "ann/1.jpg").write_bytes(b"marker")
    (out / "bo/1.png").unlink()
    assert main([str(src), str(out), "--landmarks", str(tmp_path / "lmk.txt"),
                 "--no-progress"]) == 0
    assert "aligned 1, kept 2" in capsys.readouterr().out
    assert (out / "ann/1.jpg").read_bytes() == b"marker" and (out / "bo/1.png").is_file()
    assert main([str(src), str(src / "sub"), "--landmarks", str(tmp_path / "lmk.txt")]) == 2
    assert "overlap" in capsys.readouterr().err


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        tool("align_faces")(["--help"])
    assert "align_faces.py photos/ aligned/ --landmarks lmk.txt" in capsys.readouterr().out


@pytest.fixture(scope="module")
def detector():
    from facetrain.build.landmarks import DlibDetector
    return DlibDetector()


def test_detector_on_a_real_photograph(detector, tmp_path):
    photo = cv2.imread(str(PHOTO))
    faces = detector.detect(photo)
    assert len(faces) == 1
    pts = faces[0].points
    # Plausible anatomy in image coordinates: eyes level and apart, nose below, mouth lower.
    assert pts[0, 0] < pts[2, 0] < pts[1, 0] and abs(pts[0, 1] - pts[1, 1]) < 15
    assert pts[0, 1] < pts[2, 1] < pts[3, 1] and pts[3, 0] < pts[4, 0]
    # After warping (224 so the detector sees a large face), the landmarks found again on the
    # aligned crop lie on the template: within 3 px at 112 (the detector's own jitter).
    big = align_face(photo, pts, 224)
    again = detector.detect(big)
    assert len(again) == 1
    err = np.linalg.norm(again[0].points / 2 - T, axis=1)
    assert err.max() < 3.0, err
    # A rotated, shrunk copy of the photo aligns to (nearly) the same crop.
    ang, s = 12.0, 0.8
    m = cv2.getRotationMatrix2D((256, 300), ang, s)
    turned = cv2.warpAffine(photo, m, (512, 600), borderValue=(128, 128, 128))
    f2 = detector.detect(turned)
    assert len(f2) == 1
    np.testing.assert_allclose(f2[0].points, pts @ m[:, :2].T + m[:, 2], atol=6)
    a, b = align_face(photo, pts), align_face(turned, f2[0].points)
    assert np.abs(a.astype(int) - b.astype(int))[16:96, 16:96].mean() < 20


def test_align_faces_with_the_detector(detector, tmp_path):
    from facetrain.build.align_folder import Aligner

    photo = cv2.imread(str(PHOTO))
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "one.jpg"), photo)
    two = np.full((600, 1100, 3), 200, np.uint8)               # the photo and a smaller copy
    two[:, :512] = photo
    two[100:400, 700:956] = cv2.resize(photo, (256, 300))
    cv2.imwrite(str(src / "two.png"), two)
    cv2.imwrite(str(src / "none.png"), np.full((300, 300, 3), 90, np.uint8))
    (src / "bad.jpg").write_bytes(b"\xff\xd8junk")
    s = align_folder(src, tmp_path / "out", aligner=Aligner(None, detector, "largest"))
    assert s.counts == {"aligned": 2, "no_face": 1, "unreadable": 1}
    assert s.several_kept_largest == 1
    faces = sorted(detector.detect(two), key=lambda f: f.box[0])
    assert [f.box[0] < 512 for f in faces] == [True, False]
    got = cv2.imread(str(tmp_path / "out/two.png"))             # PNG: lossless
    np.testing.assert_array_equal(got, align_face(two, faces[0].points))   # the larger face
    assert np.abs(got.astype(int) - align_face(two, faces[1].points)).mean() > 5
    s = align_folder(src, tmp_path / "skip", aligner=Aligner(None, detector, "skip"))
    assert s.counts == {"aligned": 1, "several_faces_skipped": 1, "no_face": 1, "unreadable": 1}
    assert ("two.png", "several_faces_skipped", "2 faces (`multiple='skip'`)") in s.problems
    assert _report(tmp_path / "skip")["none.png"] == "no_face"


def _dot_photos(root: Path, names, rng):
    """Photos with dots at the template under a random pose, and their landmarks-file lines."""
    lines = []
    for name in names:
        m, t = _random_pose(rng)
        pts = T @ m.T + t
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), _dots(pts, (400, 400), radius=3))
        lines.append(name + "".join(f" {v:.3f}" for v in pts.ravel()))
    return lines


def test_folders_to_rec_and_make_pack_align(tmp_path, capsys):
    from facetrain.data.dataset import RecordDataset
    from facetrain.eval.verification import load_pack

    rng = np.random.default_rng(3)
    names = ["ann/1.png", "ann/2.png", "bo/1.png", "bo/2.png"]
    lines = _dot_photos(tmp_path / "photos", names, rng)
    (tmp_path / "lmk.txt").write_text("\n".join(lines[:3]) + "\n")      # bo/2.png: none
    assert tool("folders_to_rec")([str(tmp_path / "photos"), str(tmp_path / "ds" / "train"),
                                   "--landmarks", str(tmp_path / "lmk.txt"),
                                   "--no-progress"]) == 0
    o, e = capsys.readouterr()
    assert "no_landmarks: bo/2.png: not listed in the landmarks file" in e
    assert f"aligned images in {tmp_path / 'ds' / 'aligned'}: aligned 3, no_landmarks 1" in o
    ds = RecordDataset.open(str(tmp_path / "ds" / "train"))
    assert ds.class_counts.tolist() == [2, 1] and ds.image_shape == (112, 112)
    for i in range(3):
        img = cv2.imdecode(np.frombuffer(ds.read(i)[1], np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_allclose(_centroids(img, T), T, atol=0.2)
    # make_pack --landmarks: every pair image aligned; one without landmarks names its line.
    (tmp_path / "lmk.txt").write_text("\n".join(lines) + "\n")
    rows = ["ann/1.png,ann/2.png,1", "ann/1.png,bo/1.png,0"] * 10
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pack = tmp_path / "mine.bin"
    assert tool("make_pack")([str(tmp_path / "photos"), str(tmp_path / "pairs.csv"),
                              "--output", str(pack), "--landmarks", str(tmp_path / "lmk.txt"),
                              "--no-progress"]) == 0
    bins, issame = load_pack(pack)
    assert len(bins) == 40 and issame.tolist() == [True, False] * 10
    for b in bins[:4]:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_allclose(_centroids(img, T), T, atol=0.2)
    (tmp_path / "lmk.txt").write_text("\n".join(lines[:2]) + "\n")
    assert tool("make_pack")([str(tmp_path / "photos"), str(tmp_path / "pairs.csv"),
                              "--output", str(tmp_path / "x.bin"), "--landmarks",
                              str(tmp_path / "lmk.txt"), "--no-progress"]) == 2
    assert (f"{tmp_path / 'photos' / 'bo/1.png'} (pairs file line 2): cannot align it: "
            "no_landmarks: not listed in the landmarks file") in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


def test_missing_detector_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models"
                        else real(name, *a))
    (tmp_path / "p").mkdir()
    assert tool("align_faces")([str(tmp_path / "p"), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the face detector needs the face-recognition-models package: pip install " \
        "'facetrain[align]'" in err and "or give a landmarks file" in err
