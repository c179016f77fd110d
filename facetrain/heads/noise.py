"""Counter-based Gaussian noise for LEAP's random angles: no noise tensor in memory.

alpha_{n,j} = std_n * z(row_key_n, col_key_j), where z is a standard normal computed from a hash
of two 32-bit keys (a murmur3-style finaliser, then Box-Muller). Because the value is a pure
function of its keys, the fused LEAP kernel computes it inline in the forward pass and again in
the backward pass instead of writing and re-reading a [B, C] noise block (a stored-noise version
costs ~3 extra passes over the block). Keys:
- row key: hash(step key, position of the sample in the global batch);
- column key: hash(step key, GLOBAL class id) per logit, or one constant column per sample;
- step key: hash(seed, draw counter). The counter is a device tensor bumped once per draw (no host
  sync) and is the same on every rank, so the angles do not depend on how classes are split over ranks:
  1, 2 or 3 ranks draw the same alpha for the same (sample, class).
Integer arithmetic is int32 with wrapping multiplies (as in murmur3), so CPU and GPU agree bit
for bit on the keys; int32 rather than int64 because 64-bit multiplies are emulated on GPUs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from facetrain.heads.fused import call_fused

# murmur3 fmix32 constants as signed int32 (int32 products wrap, which is the point).
_C1 = 0x85EBCA6B - (1 << 32)
_C2 = 0xC2B2AE35 - (1 << 32)
_C3 = 0x9E3779B1 - (1 << 32)
_C4 = 0x27D4EB2F
_C5 = 0x165667B1
_C6 = 0x5BD1E995


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int32 tensors: wrapping multiplies, logical shifts via masks."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def gauss(row_key: torch.Tensor, col_key: torch.Tensor) -> torch.Tensor:
    """Standard normal of broadcast(row_key [B, 1], col_key [1, C]) -> [B, C] float32: one
    hash per element, its two 16-bit halves feed Box-Muller (|z| <= 4.9)."""
    h = mix32(row_key ^ col_key)
    u1 = (((h >> 16) & 0xFFFF).to(torch.float32) + 0.5) * (1.0 / 65536.0)
    u2 = ((h & 0xFFFF).to(torch.float32) + 0.5) * (1.0 / 65536.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def _keys(counter: torch.Tensor, class_ids: Optional[torch.Tensor], seed: int,
          num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    step = mix32(counter.to(torch.int32) * _C3 + (seed & 0x7FFFFFFF))
    rows = torch.arange(num_rows, device=counter.device, dtype=torch.int32)
    row_key = mix32((rows * _C1) ^ step).unsqueeze(1)
    if class_ids is None:
        col_key = mix32(step ^ _C4).view(1, 1)
    else:
        col_key = mix32((class_ids.to(torch.int32) * _C2) ^ mix32(step + _C5)).unsqueeze(0)
    return row_key, col_key


def noise_keys(seed: int, counter: torch.Tensor, num_rows: int,
               class_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row_key [N, 1], col_key [1, C_s] or [1, 1]) int32 for one draw.

    counter: 0-d int64 device tensor (the draw index; the caller bumps it). class_ids [C_s]
    global ids of the block's columns (per-logit angles) or None (one angle per sample).
    On CUDA the ~60 tiny integer ops run as one compiled kernel (launch overhead otherwise).
    """
    return call_fused("noise_keys", _keys, counter, class_ids, seed, num_rows)


def sample_gauss(seed: int, counter: torch.Tensor, num_rows: int, salt: int) -> torch.Tensor:
    """One standard normal per sample of the global batch, [num_rows] float32, for draw `counter`.

    The same row keys as LEAP's draw with this counter (keyed on the sample's position in the
    global batch, so any world size and a resume draw the same values), with the per-sample
    column key re-hashed with `salt`: a stream independent of LEAP's angles for each salt.
    Used by margins that draw a value per sample (ElasticFace's margin)."""
    row_key, col_key = _keys(counter, None, seed, num_rows)
    return gauss(row_key, mix32(col_key ^ (salt * _C6))).view(-1)
