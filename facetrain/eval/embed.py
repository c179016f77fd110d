"""Feature extraction shared by every protocol: load a backbone, decode, resize, normalise,
batch, optional flip-sum. One code path, so LFW, IJB-C, MegaFace and re-ID see identical
preprocessing.

Input images are OpenCV-style: encoded bytes (decoded with cv2.imdecode) or HxWx3 uint8 arrays in
BGR order (what cv2.imread / cv2.warpAffine give). They become RGB, are resized to the model's
input size, scaled to [-1, 1] with (x / 255 - 0.5) / 0.5 and stacked NCHW float32.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from facetrain.data.images import decode_bgr
from facetrain.export import check_exported

ImageLike = Union[np.ndarray, bytes, bytearray, memoryview]


class ImageDecodeError(ValueError):
    """An image that OpenCV cannot decode; the message names where it came from."""


def load_backbone(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a backbone for evaluation, in eval mode on `device`.

    Accepts the trainer's export dict ``{"format": "facetrain-backbone", "version": 1,
    "backbone": name, "kwargs": {...}, "state_dict": ...}`` (rebuilt through
    facetrain.models.registry.build_backbone), a TorchScript file, or an exported
    ``backbone.onnx`` (run with onnxruntime, see facetrain.eval.onnx_backbone).
    """
    return load_backbone_with_info(path, device)[0]


def load_backbone_with_info(path: str | Path, device: torch.device | str = "cpu"
                            ) -> Tuple[nn.Module, Dict[str, Any]]:
    """`load_backbone` plus what the file says about the model: {"backbone": name,
    "image_size": the input side from the export's kwargs or the ONNX graph, or None
    (TorchScript)}."""
    path = Path(path)
    from facetrain.eval.onnx_backbone import is_onnx_file, load_onnx_backbone
    if is_onnx_file(path):
        return load_onnx_backbone(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist; give the path of an "
                                "exported backbone.pt (or a TorchScript file)")
    device = torch.device(device)
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location=device).eval(), {"image_size": None}
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as load_err:  # not a plain torch file: TorchScript archives land here
        try:
            model = torch.jit.load(str(path), map_location=device)
        except Exception as jit_err:
            raise ValueError(f"{path} is neither a facetrain backbone export ({load_err}) nor a "
                             f"TorchScript file ({jit_err})") from jit_err
        return model.eval(), {"image_size": None}
    if isinstance(obj, torch.jit.ScriptModule):
        return obj.eval(), {"image_size": None}
    check_exported(obj, path)
    from facetrain.models.registry import build_backbone  # heavy import only when needed
    model = build_backbone(obj["backbone"], **obj["kwargs"])
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval(), {"backbone": obj["backbone"],
                                     "image_size": obj["kwargs"].get("image_size")}


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a code/ folder; torch.save files have none."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n for n in zf.namelist())


def as_bgr_image(img: ImageLike, where: str = "image") -> np.ndarray:
    """Encoded bytes (decoded) or a BGR uint8 array (as is, grey made BGR) -> HxWx3 uint8 BGR
    array; raises ImageDecodeError naming `where`."""
    import cv2
    if isinstance(img, np.ndarray):
        arr = img
    else:
        data = bytes(img)
        arr, _ = decode_bgr(data)
        if arr is None:
            raise ImageDecodeError(f"{where}: OpenCV cannot decode these {len(data)} bytes "
                                   "(corrupt or not an image); remove or replace it")
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"{where}: expected an HxWx3 image; got shape {arr.shape}")
    return arr


def preprocess(images: Sequence[np.ndarray], image_size: Tuple[int, int]) -> torch.Tensor:
    """BGR uint8 HxWx3 list -> float32 [B, 3, H, W] RGB in [-1, 1]."""
    import cv2
    h, w = image_size
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.shape[:2] != (h, w):
            im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
        out[i] = im[:, :, ::-1]                       # BGR -> RGB
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    return x.div_(255.0).sub_(0.5).div_(0.5)


def _batches(images: Iterable[ImageLike], batch_size: int) -> Iterator[Tuple[int, List]]:
    batch: List = []
    start = 0
    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            yield start, batch
            start += len(batch)
            batch = []
    if batch:
        yield start, batch


@torch.inference_mode()
def extract_features(model: nn.Module, images: Iterable[ImageLike], batch_size: int = 128,
                     flip: bool = True, device: torch.device | str = "cpu",
                     image_size: int | Tuple[int, int] = 112, num_threads: int = 2,
                     progress: bool = True, desc: str = "features") -> np.ndarray:
    """Embeddings float32 [N, D] in input order (not normalised).

    flip=True returns emb(img) + emb(hflip(img)) (the usual flip-sum test-time augmentation).
    `images` may be any iterable or a Dataset (indexable with len) of bytes / BGR arrays; decode
    and resize run in `num_threads` threads (OpenCV releases the GIL).
    """
    from tqdm import tqdm
    device = torch.device(device)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    total = len(images) if hasattr(images, "__len__") else None
    if total is not None and not hasattr(images, "__iter__"):
        images = _indexed(images, total)
    chunks: List[np.ndarray] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start, batch in _batches(images, batch_size):
            decoded = list(pool.map(lambda a: as_bgr_image(a[1], f"image {a[0]}"),
                                    enumerate(batch, start)))
            x = preprocess(decoded, size).to(device)
            emb = _forward(model, x)
            if flip:
                emb = emb + _forward(model, torch.flip(x, dims=[3]))
            chunks.append(emb.float().cpu().numpy())
            bar.update(len(batch))
    bar.close()
    if not chunks:
        raise ValueError("extract_features got no images")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _indexed(dataset, n: int) -> Iterator:
    """Iterate a map-style Dataset (which need not define __iter__) in index order."""
    return (dataset[i] for i in range(n))


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):     # some exports return (embedding, extra)
        out = out[0]
    if out.ndim != 2:
        out = out.flatten(1)
    return out


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, float32; eps keeps all-zero rows at zero instead of NaN."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def load_features(path: str | Path, expected_rows: int, what: str) -> np.ndarray:
    """Load a --features .npy (float32 [N, D]) and check it: readable, 2-D, D > 0, finite, one
    row per protocol image (facetrain.eval.checks)."""
    from facetrain.eval.checks import check_features, load_feature_file
    feats = load_feature_file(path)
    check_features(feats, str(path), expected_rows, what,
                   fix="re-extract them (or run the model instead of reading `features`)")
    return np.asarray(feats, dtype=np.float32)
