"""ResNet-50 for person re-identification with a BN neck ("Bag of Tricks", Luo et al. 2019).

The trunk uses torchvision's ResNet-50 names (conv1, bn1, layer1..4 of Bottleneck blocks with
conv1-3, bn1-3, downsample.0/1) so an ImageNet torchvision checkpoint loads with
`load_imagenet_weights` (its `fc.*` is dropped). Re-ID changes: the last stage keeps stride 1
(a 256x128 input gives a 16x8 final map instead of 8x4), global average pooling, and a
BatchNorm1d neck whose bias is fixed at 0, as in Bag of Tricks. The embedding the classifier and
evaluation use is the 2048-d feature after that neck (the paper's re-ID setting, leap.md).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from facetrain.config import ConfigError
from facetrain.models.iresnet import ImageSize, to_hw
from facetrain.models.registry import register


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (stride on the 3x3 conv, "ResNet v1.5"):
    [B, cin, H, W] -> [B, 4*width, H/stride, W/stride]."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNetReID(nn.Module):
    """Re-ID backbone: float [B, 3, H, W] in [-1, 1] -> [B, embedding_size] after the BN neck.
    Replicated on every rank (data parallel).

    Args:
        layers: bottleneck blocks per stage ((3, 4, 6, 3) for ResNet-50).
        embedding_size: 2048 uses the pooled feature directly (the paper's setting); any other
            size adds a bias-free linear `reduce` 2048 -> embedding_size before the neck.
        dropout: dropout on the pooled feature (0 in Bag of Tricks).
        last_stride: stride of layer4 (1 for re-ID, 2 for the ImageNet network).
        image_size: input side or (H, W), e.g. (256, 128); each at least 32.
    """

    def __init__(self, layers: Tuple[int, int, int, int] = (3, 4, 6, 3),
                 embedding_size: int = 2048, dropout: float = 0.0, last_stride: int = 1,
                 image_size: ImageSize = (256, 128)) -> None:
        super().__init__()
        h, w = to_hw(image_size)
        if min(h, w) < 32:
            raise ConfigError(f"resnet50_reid needs inputs of at least 32x32 (it downsamples "
                              f"16x); got data.image_size={image_size!r}: use e.g. 256x128")
        self.embedding_size = embedding_size
        # model.init_allow_missing_final may leave these fresh (facetrain/models/init_from.py)
        self.final_layer = ("reduce", "neck")
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        strides = (1, 2, 2, last_stride)
        for i, (n, width, stride) in enumerate(zip(layers, (64, 128, 256, 512), strides)):
            blocks = [Bottleneck(cin, width, stride)]
            cin = width * Bottleneck.expansion
            blocks += [Bottleneck(cin, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.reduce: Optional[nn.Linear] = None
        if embedding_size != cin:
            self.reduce = nn.Linear(cin, embedding_size, bias=False)
        self.neck = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Bag of Tricks: the neck only scales (bias fixed at 0), so the cosine classifier sees
        # features centred by the BN statistics without a learned shift.
        self.neck.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> [B, embedding_size] (after the BN neck, not normalised)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.pool(x), 1))
        if self.reduce is not None:
            x = self.reduce(x)
        return self.neck(x)


def load_imagenet_weights(model: ResNetReID, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Load a torchvision ResNet-50 ImageNet state_dict into the trunk of `model`.

    Drops the checkpoint's `fc.*` (the ImageNet classifier); every trunk key must be present with
    its shape. Returns the model keys left at their initial values (neck and optional reduce)."""
    trunk: Dict[str, torch.Tensor] = {k: v for k, v in state_dict.items()
                                      if not k.startswith("fc.")}
    own = model.state_dict()
    missing_trunk = [k for k in own if k.split(".")[0].startswith(("conv1", "bn1", "layer"))
                     and k not in trunk]
    unexpected = [k for k in trunk if k not in own]
    if missing_trunk or unexpected:
        raise ValueError(f"not a torchvision ResNet-50 state_dict: missing trunk keys "
                         f"{missing_trunk[:5]}{'...' if len(missing_trunk) > 5 else ''}, "
                         f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    result = model.load_state_dict(trunk, strict=False)
    return list(result.missing_keys)


@register("resnet50_reid")
def resnet50_reid(embedding_size: int = 2048, dropout: float = 0.0,
                  image_size: ImageSize = (256, 128), last_stride: int = 1) -> ResNetReID:
    """ResNet-50 re-ID backbone with last stride 1 and a BN neck (~23.5M parameters at 2048-d)."""
    return ResNetReID((3, 4, 6, 3), embedding_size=embedding_size, dropout=dropout,
                      last_stride=last_stride, image_size=image_size)
