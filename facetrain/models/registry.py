"""Backbones chosen by name: a registry instead of an if/elif chain.

A backbone factory takes at least `embedding_size`, `dropout` and `image_size` and returns an
`nn.Module` mapping float images [B, 3, H, W] in [-1, 1] to embeddings [B, embedding_size]
(not L2-normalised; the classifier normalises). Every built module has an `embedding_size`
attribute. The trainer (facetrain.trainer.backbone_kwargs) calls

    build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                   dropout=cfg.model.dropout, image_size=side_or_hw, **extras)

where image_size is one side for square inputs, else [H, W] (data.image_size, data.image_width),
and extras holds the ViT options mask_ratio/drop_path when set and activation_checkpointing=True
when model.activation_checkpointing is on.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, List

from torch import nn

from facetrain.config import ConfigError

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: Dict[str, BackboneFactory] = {}

# Modules whose import registers the shipped backbones. Imported lazily (on the first lookup)
# so that importing facetrain.models does no work and the registry has no import cycle.
_BUILTIN_MODULES = ("facetrain.models.iresnet", "facetrain.models.resnet_reid",
                    "facetrain.models.tiny", "facetrain.models.mobilefacenet",
                    "facetrain.models.vit")


def register(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make `factory` buildable as `build_backbone(name, ...)`.

    A second registration under the same name is an error (two backbones silently shadowing each
    other would make a config mean different things depending on import order)."""
    def decorator(factory: BackboneFactory) -> BackboneFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"backbone name {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}; pick another name "
                             f"for {factory.__module__}.{factory.__qualname__}")
        _REGISTRY[name] = factory
        return factory
    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> List[str]:
    """Sorted names accepted by `build_backbone` (and by `model.backbone` in a config)."""
    _load_builtins()
    return sorted(_REGISTRY)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as `name` with the factory's keyword arguments.

    Raises ConfigError naming the valid backbones for an unknown name, and the accepted
    arguments for an unknown keyword."""
    _load_builtins()
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"model.backbone {name!r} is not a registered backbone; choose one of: "
                          f"{', '.join(sorted(_REGISTRY))}")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not takes_any:
        raise ConfigError(f"backbone {name!r} does not take argument(s) {', '.join(unknown)}; "
                          f"it accepts: {', '.join(params)}")
    return factory(**kwargs)
