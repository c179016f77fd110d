"""CUDA paths of the backbones: bf16 + channels_last + inductor (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from facetrain.models import build_backbone


# calibrate: set BN running stats from one batch first. IResNet needs it (its N(0, 0.1) conv init
# grows eval activations without it); resnet50_reid must not: on random inputs a fresh ResNet's
# features barely differ between samples, and a batch-calibrated neck amplifies that difference
# until bf16 rounding dominates (cosine ~0.6 to fp32), which says nothing about the code.
@pytest.mark.parametrize("name,size,emb,calibrate", [
    ("iresnet50", 112, 512, True), ("resnet50_reid", (256, 128), 2048, False),
    ("tiny", 32, 128, True)])
@pytest.mark.gpu
def test_compiled_bf16_channels_last_matches_eager_fp32(name: str, size, emb: int,
                                                        calibrate: bool) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=emb, image_size=size).to(dev)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.rand(16, 3, h, w, device=dev) * 2 - 1
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0                  # running stats := this batch's (see test_models._build)
    with torch.no_grad():
        if calibrate:
            model.train()(x)
        model.eval()
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        compiled = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x.contiguous(memory_format=torch.channels_last))
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=1)
    assert cos.min() > 0.99, cos
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(x.contiguous(memory_format=torch.channels_last)).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
