"""Margin kinds chosen by name (`head.margin.kind`): a registry, so the next head is one file.

A kind is a `facetrain.heads.margins.MarginKind` subclass registered under its config name; it
is built once per PartialFC with `build_margin(cfg, device)` and runs inside the one margin path
of `facetrain.heads.margins.margin_logits` (docs/heads.md says how the kinds compose with LEAP).
A new kind: one module here that decorates its class with `@register("name")`, its module name
in `_BUILTIN_MODULES`, and its name in `facetrain.config.MARGIN_KINDS` (the config validates
names without importing torch code; a test checks the two lists agree).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Type

import torch

from facetrain.config import MarginConfig
from facetrain.heads.margins import MarginKind

_REGISTRY: Dict[str, Type[MarginKind]] = {}
_BUILTIN_MODULES = ("facetrain.heads.kinds.classic", "facetrain.heads.kinds.elasticface",
                    "facetrain.heads.kinds.curricularface", "facetrain.heads.kinds.adaface",
                    "facetrain.heads.kinds.subcenter", "facetrain.heads.kinds.magface",
                    "facetrain.heads.kinds.ldam")


def register(name: str) -> Callable[[Type[MarginKind]], Type[MarginKind]]:
    """Class decorator: make `cls` the margin of `head.margin.kind=name` (one class per name)."""
    def decorator(cls: Type[MarginKind]) -> Type[MarginKind]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"margin kind {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
        _REGISTRY[name] = cls
        return cls
    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def margin_kinds() -> List[str]:
    """Registered kind names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def build_margin(cfg: MarginConfig, device: torch.device | None = None) -> MarginKind:
    """The margin of `cfg.kind`, its running statistics (if any) on `device`."""
    _load_builtins()
    if cfg.kind not in _REGISTRY:
        raise ValueError(f"head.margin.kind={cfg.kind!r} is not a registered margin kind; "
                         f"known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.kind](cfg, device)
