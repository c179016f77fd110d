"""MobileFaceNet (`mbf`, `mbf_large`) laid out as InsightFace's arcface_torch builds it.

Module names, state_dict keys and shapes follow arcface_torch's `backbones/mobilefacenet.py`, so
its published mbf checkpoints load with `load_state_dict(strict=True)` unchanged (the expected
key list is written down in tests/unit/test_models_mobilefacenet.py). Structure at 112x112:

    layers[0]  ConvBlock 3x3 s2 (3 -> 64*scale)                                   56x56
    layers[1]  grouped 3x3 ConvBlock (blocks[0] == 1) or a Residual stack         56x56
    layers[2]  DepthWise s2 -> layers[3] Residual x blocks[1]                      28x28
    layers[4]  DepthWise s2 -> layers[5] Residual x blocks[2]  (128*scale ch.)     14x14
    layers[6]  DepthWise s2 -> layers[7] Residual x blocks[3]                       7x7
    conv_sep   1x1 ConvBlock -> 512
    features   GDC: 7x7 depthwise LinearBlock -> flatten -> Linear(512, D) -> BN1d(D)

A ConvBlock is conv -> BN -> PReLU, a LinearBlock conv -> BN, a DepthWise block 1x1 expand ->
grouped 3x3 -> 1x1 project (with a skip inside a Residual stack). `mbf` is scale 2 with blocks
(1, 4, 6, 2); `mbf_large` scale 4 with (2, 8, 12, 4). Other input sizes work when divisible by 16:
the GDC kernel is then the final map's size (its weight shape changes with it).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from facetrain.config import ConfigError
from facetrain.models.iresnet import ImageSize, to_hw
from facetrain.models.registry import register

Pair = Tuple[int, int]


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU, held in `layers` as arcface_torch names it (so its
    published weights load by name); `act=False` drops the PReLU."""

    def __init__(self, cin: int, cout: int, kernel: Pair = (1, 1), stride: Pair = (1, 1),
                 padding: Pair = (0, 0), groups: int = 1, act: bool = True) -> None:
        super().__init__()
        parts = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                           bias=False),
                 nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*parts, *([nn.PReLU(cout)] if act else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(ConvBlock):
    """conv (no bias) -> BN, no activation (the projection of a bottleneck)."""

    def __init__(self, cin: int, cout: int, kernel: Pair = (1, 1), stride: Pair = (1, 1),
                 padding: Pair = (0, 0), groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding, groups, act=False)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 to `hidden` channels, depthwise 3x3 (stride), 1x1 to `cout`;
    `residual` adds the input (only used with stride 1 and cin == cout)."""

    def __init__(self, cin: int, cout: int, residual: bool = False, stride: int = 2,
                 hidden: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, hidden),
            ConvBlock(hidden, hidden, kernel=(3, 3), stride=(stride, stride), padding=(1, 1),
                      groups=hidden),
            LinearBlock(hidden, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`n` stride-1 residual DepthWise blocks at `c` channels."""

    def __init__(self, c: int, n: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, residual=True, stride=1, hidden=hidden)
                                      for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the whole final map, then Linear(512, D) -> BN1d(D); held in
    `layers` (0: LinearBlock, 1: Flatten, 2: Linear, 3: BN1d) as arcface_torch names it."""

    def __init__(self, embedding_size: int, kernel: Pair) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=kernel, groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """Face backbone: float [B, 3, H, W] in [-1, 1] -> embeddings [B, embedding_size] (after BN1d,
    not normalised).

    Args:
        blocks: residual blocks in the four stages (stage 0 with 1 block is a plain grouped conv).
        scale: channel multiplier (2 for mbf, 4 for mbf_large).
        embedding_size: output dimension.
        dropout: dropout on the flattened GDC output before the linear layer (0 in arcface_torch;
            kept outside the `features` Sequential so the checkpoint keys do not move).
        image_size: input side or (H, W), each divisible by 16.
        fp32_head: run conv_sep + GDC in float32 under autocast, as arcface_torch does with fp16.
    """

    def __init__(self, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2,
                 embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
                 fp32_head: bool = True, name: str = "mbf") -> None:
        super().__init__()
        h, w = to_hw(image_size)
        if h % 16 or w % 16 or h <= 0 or w <= 0:
            raise ConfigError(f"{name} needs input sides divisible by 16 (its total "
                              f"downsampling); got data.image_size={image_size!r}: use e.g. "
                              "32, 64 or 112")
        self.image_size = (h, w)
        self.embedding_size = embedding_size
        self.fp32_head = fp32_head
        # model.init_allow_missing_final may leave these fresh (facetrain/models/init_from.py)
        self.final_layer = ("features.layers.2", "features.layers.3")
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            # arcface_torch's stage 0 for mbf: a 3x3 conv in 64 groups (2 channels per group).
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], hidden=128))
        self.layers.extend([
            DepthWise(c1, c1, stride=2, hidden=128),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, stride=2, hidden=256),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, stride=2, hidden=512),
            Residual(c2, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size, (h // 16, w // 16))
        self.dropout = nn.Dropout(p=dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's: He-normal (fan_out) for convs and the linear layer, BN affine 1/0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_sep(x)
        gdc, flat, linear, bn = self.features.layers
        return bn(linear(self.dropout(flat(gdc(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] at the built image size -> [B, embedding_size]."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"MobileFaceNet was built for {self.image_size[0]}x"
                             f"{self.image_size[1]} inputs (data.image_size) but got "
                             f"{tuple(x.shape)}")
        for layer in self.layers:
            x = layer(x)
        if self.fp32_head and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._head(x.float())
        return self._head(x)


@register("mbf")
def mbf(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
        fp32_head: bool = True) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch's `mbf` (scale 2, blocks 1/4/6/2), 2.06M parameters at
    112x112 / 512-d."""
    return MobileFaceNet((1, 4, 6, 2), 2, embedding_size, dropout, image_size, fp32_head, "mbf")


@register("mbf_large")
def mbf_large(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
              fp32_head: bool = True) -> MobileFaceNet:
    """arcface_torch's `mbf_large` (scale 4, blocks 2/8/12/4), 6.31M parameters at 112x112 /
    512-d."""
    return MobileFaceNet((2, 8, 12, 4), 4, embedding_size, dropout, image_size, fp32_head,
                         "mbf_large")
