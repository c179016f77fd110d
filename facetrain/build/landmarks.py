"""Where five face landmarks come from: a landmarks file the user gives, or a detector whose model
files a package installs (never downloaded at run time).

Landmarks file (InsightFace's layout, e.g. IJB-C's name_5pts_score.txt): one line per image,
`name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]`, name relative to the image folder, points in the
template's order (facetrain.build.align).

Detector: dlib's HOG frontal face detector (built into dlib) and its 68-point shape predictor
from the `face-recognition-models` package (`pip install 'facetrain[align]'`, which pins
dlib-bin and face-recognition-models). The five points are the two eye centres (mean of each
eye's six points), the nose tip (point 30) and the mouth corners (points 48, 54). That
predictor was trained on the iBUG 300-W data, whose licence excludes commercial use.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

INSTALL_HINT = ("pip install 'facetrain[align]' (dlib-bin and face-recognition-models, which "
                "ship the detector and its model files), or give a landmarks file")


def read_landmarks_file(path: str | Path) -> Dict[str, np.ndarray]:
    """{image name: [5, 2] float64} from `name x1 y1 ... x5 y5 [score]` lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmarks file {path} does not exist")
    out: Dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as fh:
        for no, raw in enumerate(fh, start=1):
            f = raw.split()
            if not f:
                continue
            where = f"{path}, line {no}"
            if len(f) not in (11, 12):
                raise ValueError(f"{where}: expected `name x1 y1 ... x5 y5 [score]` (11 or 12 "
                                 f"fields); got {len(f)}: {raw.strip()!r}")
            try:
                pts = np.array([float(v) for v in f[1:11]], np.float64).reshape(5, 2)
            except ValueError:
                raise ValueError(f"{where}: the ten coordinates must be numbers; got "
                                 f"{' '.join(f[1:11])!r}") from None
            if not np.isfinite(pts).all():
                raise ValueError(f"{where}: coordinates must be finite; got {pts.ravel()}")
            if f[0] in out:
                raise ValueError(f"{where}: {f[0]} is listed twice")
            out[f[0]] = pts
    return out


@dataclass
class Face:
    box: tuple           # (left, top, right, bottom) in pixels
    score: float
    points: np.ndarray   # [5, 2] float64, template order

    @property
    def area(self) -> float:
        return float(max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1]))


def _models_dir() -> Path:
    """face_recognition_models' model folder, found without importing the package (its
    __init__ needs pkg_resources, which new setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the face detector needs the face-recognition-models package: "
                          f"{INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibDetector:
    """Faces and their five landmarks in a BGR image (CPU, a few hundred ms per photo)."""

    PREDICTOR = "shape_predictor_68_face_landmarks.dat"

    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError:
            raise ImportError(f"the face detector needs dlib: {INSTALL_HINT}") from None
        model = _models_dir() / self.PREDICTOR
        if not model.is_file():
            raise ImportError(f"{model} is missing from face-recognition-models: reinstall it "
                              "(pip install --force-reinstall face-recognition-models==0.3.0)")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(model))
        self._upsample = upsample

    def detect(self, bgr: np.ndarray) -> List[Face]:
        import cv2

        rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        rects, scores, _ = self._detector.run(rgb, self._upsample, 0.0)
        faces = []
        for r, s in zip(rects, scores):
            shape = self._predictor(rgb, r)
            p = np.array([[q.x, q.y] for q in shape.parts()], np.float64)
            five = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
            faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(s), five))
        return faces
