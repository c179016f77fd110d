"""The exported backbone.onnx computes what the PyTorch backbone computes (onnxruntime, CPU), for
every registered backbone at batch sizes 1 and 8; and the evaluators run it via --model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain import export
from facetrain.models.registry import available, build_backbone

# Small inputs each family accepts (four stride-2 stages; re-ID needs >= 32), for fast exports.
SMALL_SIZE = {"resnet50_reid": (64, 32), "vit_t": (36, 27), "vit_s": (36, 27), "vit_b": (36, 27),
              "vit_l": (36, 27)}   # ViTs: 4 x 3 patches of 9, so attention mixes 12 tokens
DEFAULT_SMALL = 16


def _trim_depth(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The largest backbones keep their widths and block types but only a few blocks, so the
    export stays seconds long (iresnet200 and the 76M-256M-parameter ViTs otherwise take minutes
    and gigabytes); every block type still goes through the exporter."""
    if name == "iresnet200":
        for stage in ("layer2", "layer3"):
            setattr(model, stage, getattr(model, stage)[:2])
    elif name in ("vit_s", "vit_b", "vit_l"):
        model.blocks = model.blocks[:2]
    return model


def _randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode BN is really exercised."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name", available())
def test_onnx_export_matches_pytorch(name, tmp_path):
    import onnxruntime as ort

    size = SMALL_SIZE.get(name, DEFAULT_SMALL)
    kwargs = {"embedding_size": 32, "dropout": 0.0, "image_size": size}
    torch.manual_seed(0)
    model = _trim_depth(name, build_backbone(name, **kwargs))
    _randomize_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    paths = export.export_backbone(model, name, kwargs, tmp_path, image_size=size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(paths["onnx"]), opts, providers=["CPUExecutionProvider"])
    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(2)
    for batch in (1, 8):
        x = torch.rand(batch, 3, h, w, generator=gen) * 2 - 1
        with torch.inference_mode():
            want = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == want.shape == (batch, 32)
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{name} batch {batch}")
