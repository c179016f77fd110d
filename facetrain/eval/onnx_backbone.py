"""Run an exported `backbone.onnx` with onnxruntime as a drop-in for the PyTorch backbone, so the
evaluators can take `--model backbone.onnx` as InsightFace's ONNX evaluation does (and so the
numbers of the file users deploy can be checked, not only those of backbone.pt).

onnxruntime is an optional dependency (extras `onnx` and `dev`); it is imported on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn


def is_onnx_file(path: str | Path) -> bool:
    """ONNX models are protobufs without a magic number: go by the .onnx suffix."""
    return Path(path).suffix.lower() == ".onnx"


class OnnxBackbone(nn.Module):
    """Callable like the backbone: float images [B, 3, H, W] -> embeddings [B, D] (torch).

    Inference runs in onnxruntime (CPU, or CUDA when asked and available); the result comes
    back on the input's device.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu",
                 num_threads: Optional[int] = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ValueError(f"{path}: running an ONNX model needs onnxruntime "
                             "(pip install onnxruntime, or the extras facetrain[onnx])") from err
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as err:   # onnxruntime raises its own classes for a bad graph
            raise ValueError(f"{path}: onnxruntime cannot load this ONNX model ({err}); "
                             "re-export it with facetrain.export.export_onnx") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one input images[N, 3, H, W]; got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.path = Path(path)

    def input_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) when the graph fixes them (facetrain's exports do), else None."""
        h, w = self.session.get_inputs()[0].shape[2:]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, np.float32)).to(x.device)


def load_onnx_backbone(path: str | Path, device: torch.device | str = "cpu"
                       ) -> Tuple[OnnxBackbone, Dict[str, Any]]:
    """(model, info) like embed.load_backbone_with_info: info["image_size"] from the graph."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; give the path of an "
                                "exported backbone.onnx")
    model = OnnxBackbone(path, device)
    size = model.input_size()
    info: Dict[str, Any] = {"backbone": "onnx", "image_size": list(size) if size else None}
    return model.eval(), info

