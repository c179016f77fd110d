"""IResNet-18/34/50/100/200: the face-recognition ResNet of ArcFace / InsightFace.

Module names, state_dict keys and shapes follow InsightFace's `arcface_torch` backbones, so their
published iresnet checkpoints load with `load_state_dict(strict=True)` and no key remapping
(the pinned key list is tests/fixtures/iresnet_keys_iresnet50.txt). Structure:

    stem   conv1 3x3 s1 -> bn1 -> prelu
    layerK IBasicBlock x n: bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride) -> bn3, + skip
           (the first block of every stage has stride 2 and a 1x1-conv + BN `downsample`)
    head   bn2 (BN2d) -> flatten -> dropout -> fc -> features (BN1d, weight fixed at 1)

Four stride-2 stages, so the fc input is widths[-1] * (H/16) * (W/16): 512*7*7 at 112x112.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from facetrain.config import ConfigError
from facetrain.models.checkpointing import checkpointed
from facetrain.models.registry import register

ImageSize = Union[int, Sequence[int]]

# Blocks per stage, as in InsightFace's iresnet18/34/50/100.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
          200: (6, 26, 60, 6)}


def to_hw(image_size: ImageSize, what: str = "data.image_size") -> Tuple[int, int]:
    """(H, W) from an int side or an (H, W) pair; errors name `what`."""
    if isinstance(image_size, int):
        return image_size, image_size
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise ConfigError(f"{what} must be one side or an (H, W) pair; got {image_size!r}")
    return hw[0], hw[1]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual block: [B, cin, H, W] -> [B, cout, H/stride, W/stride].

    The stride sits on the second conv (as in InsightFace), so the first 3x3 conv runs at the
    input resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


class IResNet(nn.Module):
    """Face backbone: float [B, 3, H, W] in [-1, 1] -> embeddings [B, embedding_size] (after BN1d,
    not normalised). Replicated on every rank (data parallel).

    Args:
        layers: blocks per stage (4 stages).
        widths: channels per stage; (64, 128, 256, 512) is InsightFace's.
        embedding_size: output dimension (512 for the face models).
        dropout: dropout on the flattened feature map before the fc (InsightFace's place).
        image_size: input side or (H, W); each must be divisible by 16.
        fp32_head: run fc + features in float32 even under autocast, as InsightFace does, so the
            embeddings the margin sees do not carry bf16/fp16 rounding of a 25,088-long dot product.
        stem_stride, strides: InsightFace's are 1 and (2, 2, 2, 2); the CPU `tiny` variant moves
            the first downsampling into the stem (2, then 1, 2, 2, 2) so no block runs at full
            resolution. Inputs must be divisible by their product (16 for both).
        name: used in error messages.
        activation_checkpointing: recompute each residual block in the backward pass instead of
            keeping its activations (training only): the same gradients for about a third more
            compute and a fraction of the activation memory.
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
                 fp32_head: bool = True, stem_stride: int = 1,
                 strides: Sequence[int] = (2, 2, 2, 2), name: str = "iresnet",
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or len(strides) != 4:
            raise ValueError(f"{name}: layers, widths and strides need 4 stages; got "
                             f"layers={layers}, widths={widths}, strides={strides}")
        h, w = to_hw(image_size)
        div = stem_stride * math.prod(strides)
        if h % div or w % div or h <= 0 or w <= 0:
            raise ConfigError(
                f"{name} needs input sides divisible by {div} (its total downsampling); got "
                f"data.image_size={image_size!r}: use e.g. 32, 48, 64 or 112")
        self.image_size = (h, w)
        self.embedding_size = embedding_size
        self.fp32_head = fp32_head
        self.activation_checkpointing = activation_checkpointing
        # model.init_allow_missing_final may leave these fresh (facetrain/models/init_from.py)
        self.final_layer = ("fc", "features")

        self.conv1 = _conv3x3(3, widths[0], stem_stride)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, cout, stride) in enumerate(zip(layers, widths, strides)):
            blocks = [IBasicBlock(cin, cout, stride=stride)]
            blocks += [IBasicBlock(cout, cout) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * (h // div) * (w // div), embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # InsightFace's initialisation (conv N(0, 0.1), BN affine 1/0), kept so training from
        # scratch behaves like theirs; the BN1d scale is fixed at 1 and not trained, as theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] at the built image size -> [B, embedding_size]."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"IResNet was built for {self.image_size[0]}x{self.image_size[1]} "
                             f"inputs (data.image_size) but got {tuple(x.shape)}; resize the "
                             f"images or build with image_size={tuple(x.shape[-2:])}")
        x = self.prelu(self.bn1(self.conv1(x)))
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in stage:
                    x = checkpointed(block, x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        if self.fp32_head and torch.is_autocast_enabled(x.device.type):
            # Autocast off for the head only: fc + BN1d in float32 (see class docstring).
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.features(self.fc(x.float()))
        return self.features(self.fc(x))


def _make(depth: int, embedding_size: int, dropout: float, image_size: ImageSize,
          fp32_head: bool, activation_checkpointing: bool = False) -> IResNet:
    return IResNet(DEPTHS[depth], embedding_size=embedding_size, dropout=dropout,
                   image_size=image_size, fp32_head=fp32_head, name=f"iresnet{depth}",
                   activation_checkpointing=activation_checkpointing)


@register("iresnet18")
def iresnet18(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
              fp32_head: bool = True, activation_checkpointing: bool = False) -> IResNet:
    """IResNet-18 (2,2,2,2 blocks), ~24.0M parameters at 112x112 / 512-d."""
    return _make(18, embedding_size, dropout, image_size, fp32_head, activation_checkpointing)


@register("iresnet34")
def iresnet34(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
              fp32_head: bool = True, activation_checkpointing: bool = False) -> IResNet:
    """IResNet-34 (3,4,6,3 blocks), ~34.1M parameters at 112x112 / 512-d."""
    return _make(34, embedding_size, dropout, image_size, fp32_head, activation_checkpointing)


@register("iresnet50")
def iresnet50(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
              fp32_head: bool = True, activation_checkpointing: bool = False) -> IResNet:
    """IResNet-50 (3,4,14,3 blocks), ~43.6M parameters at 112x112 / 512-d."""
    return _make(50, embedding_size, dropout, image_size, fp32_head, activation_checkpointing)


@register("iresnet100")
def iresnet100(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
               fp32_head: bool = True, activation_checkpointing: bool = False) -> IResNet:
    """IResNet-100 (3,13,30,3 blocks), ~65.2M parameters at 112x112 / 512-d."""
    return _make(100, embedding_size, dropout, image_size, fp32_head, activation_checkpointing)


@register("iresnet200")
def iresnet200(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
               fp32_head: bool = True, activation_checkpointing: bool = False) -> IResNet:
    """IResNet-200 (6,26,60,6 blocks), ~118.8M parameters at 112x112 / 512-d."""
    return _make(200, embedding_size, dropout, image_size, fp32_head, activation_checkpointing)
