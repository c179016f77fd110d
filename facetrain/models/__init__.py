"""facetrain.models: backbones chosen by name (see registry.py).

`build_backbone(name, embedding_size=..., dropout=..., image_size=...)` and `available()`;
the shipped backbones are imported on the first lookup, not here."""
from facetrain.models.registry import available, build_backbone, register

__all__ = ["available", "build_backbone", "register"]
