"""resnet50_reid: torchvision-compatible trunk, last stride 1, BN neck with a frozen bias."""
from __future__ import annotations

import pytest
import torch

from facetrain.config import ConfigError
from facetrain.models import build_backbone
from facetrain.models.resnet_reid import load_imagenet_weights

# torchvision resnet50: 25,557,032 parameters, of which fc has 2048*1000 + 1000.
TORCHVISION_TRUNK_PARAMS = 25_557_032 - 2_049_000


def _meta(**kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_backbone("resnet50_reid", **kw)


def test_trunk_has_torchvision_names_and_size() -> None:
    model = _meta(embedding_size=2048)
    trunk = {n: p for n, p in model.named_parameters() if not n.startswith("neck.")}
    assert sum(p.numel() for p in trunk.values()) == TORCHVISION_TRUNK_PARAMS
    keys = set(model.state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.num_batches_tracked", "layer3.5.conv3.weight",
              "layer4.2.bn3.bias", "neck.weight", "neck.bias"]:
        assert k in keys, k
    assert tuple(model.layer4[0].conv2.weight.shape) == (512, 512, 3, 3)
    assert {k.split(".")[0] for k in keys} == {"conv1", "bn1", "layer1", "layer2", "layer3",
                                               "layer4", "neck"}


def test_last_stride_one_and_neck() -> None:
    model = build_backbone("resnet50_reid", embedding_size=2048, image_size=(64, 32)).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 32))
    assert seen["shape"] == (1, 2048, 4, 2)                  # 1/16, not 1/32
    assert out.shape == (1, 2048) and model.embedding_size == 2048
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad
    assert model.reduce is None


def test_other_embedding_size_adds_a_reduction() -> None:
    model = _meta(embedding_size=512)
    assert tuple(model.reduce.weight.shape) == (512, 2048)
    assert tuple(model.neck.weight.shape) == (512,)


def test_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"at least 32x32.*data\.image_size"):
        build_backbone("resnet50_reid", image_size=16)


def test_load_imagenet_weights_round_trip() -> None:
    torch.manual_seed(0)
    src = build_backbone("resnet50_reid", image_size=(64, 32))
    ckpt = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("neck.")}
    ckpt["fc.weight"], ckpt["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.manual_seed(1)
    dst = build_backbone("resnet50_reid", image_size=(64, 32))
    left = load_imagenet_weights(dst, ckpt)
    # (BatchNorm fills a missing num_batches_tracked itself, so it is not reported)
    assert sorted(left) == ["neck.bias", "neck.running_mean", "neck.running_var", "neck.weight"]
    torch.testing.assert_close(dst.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    with pytest.raises(ValueError, match="missing trunk keys"):
        load_imagenet_weights(dst, {"conv1.weight": ckpt["conv1.weight"]})
