"""Small IResNet-style backbones that train on CPU in minutes (demo, tests, CI)."""
from __future__ import annotations

from facetrain.models.iresnet import ImageSize, IResNet
from facetrain.models.registry import register


@register("iresnet_tiny")
def iresnet_tiny(embedding_size: int = 512, dropout: float = 0.0,
                 image_size: ImageSize = 32) -> IResNet:
    """IResNet structure with widths (16, 32, 64, 128) and one block per stage."""
    return IResNet((1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=embedding_size,
                   dropout=dropout, image_size=image_size, name="iresnet_tiny")


@register("tiny")
def tiny(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 32) -> IResNet:
    """iresnet_tiny with the first downsampling moved into the stem (no block at full resolution)."""
    return IResNet((1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=embedding_size,
                   dropout=dropout, image_size=image_size, stem_stride=2, strides=(1, 2, 2, 2),
                   name="tiny")
