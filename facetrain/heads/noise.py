"""Counter-based Gaussian noise for LEAP's random angles: no noise tensor in memory.

alpha_{n,j} = std_n * z(row_key_n, col_key_j), where z is a standard normal computed from a hash
of two 32-bit keys (a murmur3-style finaliser, then Box-Muller). Because the value is a pure
function of its keys, the fused LEAP kernel computes it inline in the forward pass and again in
the backward pass instead of writing and re-reading a [B, C] noise block (a stored-noise version
costs ~3 extra passes over the block). Keys:
- row key: hash(step key, position of the sample in the global batch);
- column key: hash(step key, GLOBAL class id) per logit, or one constant column per sample;
- step key: hash(seed, draw counter). The counter is a device tensor bumped once per draw (no host
  sync) and is the same on every rank, so the angles do not depend on how classes are sharded:
  1, 2 or 3 ranks draw the same alpha for the same (sample, class).
Integer arithmetic stays below 2^63 (16-bit split multiply), so CPU and GPU agree bit for bit on
the keys. 24-bit uniforms bound |z| by about 5.9.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without int64 overflow."""
    hi = ((x >> 16) * c) & 0xFFFF
    return ((hi << 16) + (x & 0xFFFF) * c) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gauss(row_key: torch.Tensor, col_key: torch.Tensor) -> torch.Tensor:
    """Standard normal of broadcast(row_key [B, 1], col_key [1, C]) -> [B, C] float32."""
    h1 = mix32(row_key ^ col_key)
    h2 = mix32(h1 ^ 0x68E31DA4)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    u2 = ((h2 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def noise_keys(seed: int, counter: torch.Tensor, num_rows: int,
               class_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row_key [N, 1], col_key [1, C_s] or [1, 1]) int64 for one draw.

    counter: 0-d int64 device tensor (the draw index; the caller bumps it). class_ids [C_s]
    global ids of the block's columns (per-logit angles) or None (one angle per sample).
    """
    step = mix32(counter * 0x9E3779B1 + (seed & _M32))
    rows = torch.arange(num_rows, device=counter.device, dtype=torch.int64)
    row_key = mix32(_mul32(rows, 0x85EBCA77) ^ step).unsqueeze(1)
    if class_ids is None:
        col_key = mix32(step ^ 0x27D4EB2F).view(1, 1)
    else:
        col_key = mix32(_mul32(class_ids.to(torch.int64), 0xC2B2AE3D) ^ mix32(step + 0x165667B1)).unsqueeze(0)
    return row_key, col_key
