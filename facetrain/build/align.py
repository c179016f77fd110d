"""The one 5-point face alignment of the project: a least-squares similarity transform (Umeyama)
from five landmarks to the ArcFace 112x112 template, applied with cv2.warpAffine.

Every aligner uses this module (data_tools/align_faces.py, folders_to_rec.py --align,
make_pack.py --align and the IJB-C evaluator), so training crops and evaluation crops are cut the
same way; a different fit (e.g. a robust estimator that ignores a point) shifts crops by pixels,
which is the usual reason IJB-C results fall short of published ones.

Landmark order (the template's, image coordinates x, y): the eye on the image's left, the eye on
the image's right, the nose tip, the mouth corner on the image's left, the one on its right.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 float64 matrix [sR | t] minimising sum |s R src_i + t - dst_i|^2 over rotations R
    (no reflection), scales s > 0 and shifts t (Umeyama 1991, closed form)."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need matching point sets of >= 2 points; got {src.shape} and "
                         f"{dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum() / src.shape[0]
    if not np.isfinite(var_s) or var_s < 1e-12:
        raise ValueError(f"landmarks {np.round(src, 1).tolist()} are degenerate (all at one "
                         "point or not finite); no similarity transform fits them")
    cov = xd.T @ xs / src.shape[0]
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:     # best orthogonal map is a reflection
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((d * sign).sum() / var_s)
    out = np.empty((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def arcface_matrix(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The 2x3 matrix taking five landmarks [5, 2] onto the template scaled to `image_size`."""
    pts = np.asarray(landmarks, np.float64)
    if pts.size != 10:
        raise ValueError(f"expected 5 landmarks (x, y); got {pts.size} numbers")
    return similarity_transform(pts.reshape(5, 2),
                                ARCFACE_TEMPLATE_112.astype(np.float64) * (image_size / 112.0))


def align_face(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112,
               border_value: Optional[float] = 0.0) -> np.ndarray:
    """Warp an image so its five landmarks land on the ArcFace template: image_size^2 crop,
    bilinear, constant border."""
    import cv2

    m = arcface_matrix(landmarks, image_size)
    return cv2.warpAffine(img, m, (image_size, image_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
