"""Decoding encoded images: the one OpenCV call every reader of image bytes goes through
(training loader, folder import, evaluation)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def decode_bgr(data: bytes) -> Tuple[Optional[np.ndarray], str]:
    """(HxWx3 uint8 BGR image, "") or (None, why) for encoded image bytes. Never raises for bad
    bytes (OpenCV asserts on an empty buffer, which names no file): callers name the source."""
    import cv2

    if not data:
        return None, "empty file (0 bytes)"
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        return None, f"OpenCV cannot decode it ({str(exc).strip().splitlines()[-1]})"
    if arr is None:
        return None, "cannot be decoded as an image"
    return arr, ""
