"""The trained backbone as a file for evaluation and deployment: `backbone.pt` and `backbone.onnx`.

`backbone.pt` is a dict {format, version, backbone, kwargs, state_dict}: `check_exported` is the
one place that says whether a loaded object is such a file (facetrain.eval.embed reads exports
through it). The ONNX graph takes float images [N, 3, H, W] in [-1, 1] and returns embeddings
[N, D] (not normalised), with a dynamic batch dimension.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import torch

EXPORT_FORMAT = "facetrain-backbone"
EXPORT_VERSION = 1
_KEYS = ("backbone", "kwargs", "state_dict")


class ExportFormatError(ValueError):
    """A file that is not a backbone export this facetrain can read."""


def check_exported(obj: Any, path: Union[str, Path]) -> Dict[str, Any]:
    """`obj` (a loaded `backbone.pt`) if it is an export of this version, else ExportFormatError
    naming `path` and what is wrong."""
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ExportFormatError(
            f"{path} is not a {EXPORT_FORMAT} file (expected a dict with "
            f"format={EXPORT_FORMAT!r}; got {keys}). A training checkpoint must be exported "
            "first: facetrain.export.export_backbone")
    if obj.get("version") != EXPORT_VERSION:
        raise ExportFormatError(f"{path}: backbone export version {obj.get('version')!r} is not "
                                f"supported (this facetrain reads version {EXPORT_VERSION}); "
                                "re-export with this facetrain version")
    for key in _KEYS:
        if key not in obj:
            raise ExportFormatError(f"{path}: backbone export lacks key {key!r}")
    return obj


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_backbone(backbone: torch.nn.Module, name: str, kwargs: Dict[str, Any],
                    out_dir: Path, image_size: Union[int, Sequence[int]],
                    onnx: bool = True) -> Dict[str, Path]:
    """Write `backbone.pt` (loadable by `facetrain.models.registry.build_backbone(name,
    **kwargs)`) and, with `onnx`, `backbone.onnx`. Returns {"torch": path[, "onnx": path]}.
    Call on rank 0 only."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # float32 whatever the training precision (DeepSpeed bf16/fp16 casts the module itself).
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in backbone.state_dict().items()}
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "backbone": name,
               "kwargs": dict(kwargs), "state_dict": state}
    paths = {"torch": out_dir / "backbone.pt"}
    _atomic_torch_save(payload, paths["torch"])
    if onnx:
        paths["onnx"] = out_dir / "backbone.onnx"
        export_onnx(backbone, paths["onnx"], image_size)
    return paths


def export_onnx(backbone: torch.nn.Module, path: Path,
                image_size: Union[int, Sequence[int]]) -> None:
    """ONNX via the TorchScript-based exporter: the dynamo exporter needs onnxscript, which is
    not a dependency; the traced graph of a plain CNN is the same."""
    model = copy.deepcopy(backbone).float().cpu().eval()
    model = model.to(memory_format=torch.contiguous_format)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    dummy = torch.zeros(2, 3, h, w)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["embeddings"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    os.replace(tmp, path)
