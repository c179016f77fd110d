"""Fused-kernel helpers: elementwise functions compiled by torch.compile on CUDA, eager elsewhere.

LEAP's perturbation of a [B, C] logit block and the noise keys are chains of elementwise ops
that eager PyTorch runs as many passes over memory; compiled, each becomes one kernel. Every
caller goes through `call_fused`, which falls back to the same eager function on CPU, with
FACETRAIN_COMPILE_LEAP=0, or when compiling fails.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict

import torch

_FUSED: Dict[str, Callable] = {}


def _maybe_fused(name: str, fn: Callable, like: torch.Tensor) -> Callable:
    """On CUDA, `fn` compiled by torch.compile into one kernel (eager it is ~20 passes over the
    [B, C] block, the bulk of LEAP's cost); eager on CPU, with FACETRAIN_COMPILE_LEAP=0, or if
    compiling fails (warned once)."""
    if not like.is_cuda or os.environ.get("FACETRAIN_COMPILE_LEAP", "1") == "0":
        return fn
    if name not in _FUSED:
        _FUSED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _FUSED[name]


def call_fused(name: str, fn: Callable, *args):
    """fn(*args), compiled on CUDA (see _maybe_fused); args[0] must be a tensor."""
    impl = _maybe_fused(name, fn, args[0])
    if impl is fn:
        return fn(*args)
    try:
        return impl(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the same math
        warnings.warn(f"LEAP: torch.compile of {name} failed ({type(exc).__name__}: {exc}); using "
                      "the eager version (set FACETRAIN_COMPILE_LEAP=0 to skip compiling)")
        _FUSED[name] = fn
        return fn(*args)
