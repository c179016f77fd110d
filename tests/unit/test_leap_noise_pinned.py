"""LEAP's random angles stay today's: the study's runs and their resumes depend on drawing the
same alpha for the same (seed, draw, sample, class). The integer hash bits are pinned by a
digest taken before any speed work (exact on every machine); the floats must equal, bit for
bit, today's formulas written out below (same torch ops, so the same result on any CPU)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from facetrain.heads import feature_cloud, noise
from facetrain.heads.margins import EPS

M32 = 0xFFFFFFFF


def _fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix32 in uint64 arithmetic masked to 32 bits (independent of torch's int32)."""
    x = x.astype(np.uint64) & M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _sha(a) -> str:
    a = a.detach().contiguous().numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _keys(per_logit: bool):
    ids = torch.arange(3, 3000, 7, dtype=torch.int64)                # global class ids
    return noise.noise_keys(1234, torch.tensor(17, dtype=torch.int64), 96,
                            ids if per_logit else None)


def _todays_gauss(row_key: torch.Tensor, col_key: torch.Tensor) -> torch.Tensor:
    h = torch.from_numpy(_fmix32((row_key ^ col_key).numpy()).astype(np.int64))
    u1 = (((h >> 16) & 0xFFFF).to(torch.float32) + 0.5) * (1.0 / 65536.0)
    u2 = ((h & 0xFFFF).to(torch.float32) + 0.5) * (1.0 / 65536.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def test_noise_bits_are_pinned_and_floats_are_todays():
    rk, ck = _keys(True)
    bits = _fmix32((rk ^ ck).numpy()).astype(np.uint32)
    assert _sha(rk) == "3b05c7a049067978" and _sha(ck) == "ff2d31ca54dabf9a"
    assert _sha(bits) == "9e8422ffe0f30096"
    z = noise.gauss(rk, ck)
    assert z.shape == (96, 429) and z.dtype == torch.float32
    assert torch.equal(z, _todays_gauss(rk, ck))
    assert np.allclose(z[0, :4].numpy(), [0.38017, -1.453449, -0.284949, -1.005733], atol=1e-5)
    rk1, ck1 = _keys(False)
    assert torch.equal(noise.gauss(rk1, ck1), _todays_gauss(rk1, ck1))
    assert _sha(noise.sample_gauss(5, torch.tensor(3), 64, 11).numpy().round(4)) == \
        "3cf9d0e44915ccec"


def _todays_cloud(cos, std, rk, ck, scale, grad):
    theta = torch.clamp(torch.acos(torch.clamp(cos, -1.0 + EPS, 1.0 - EPS))
                        + std * _todays_gauss(rk, ck), 0.0, math.pi)
    out = torch.where(std > 0, torch.cos(theta), cos) * scale
    inside = (cos > -1.0 + EPS) & (cos < 1.0 - EPS)
    sin_in = torch.sqrt(torch.clamp(1.0 - cos * cos, min=2.0 * EPS))
    ratio = torch.where(inside, torch.sin(theta) / sin_in, torch.zeros_like(cos))
    return out, torch.where(std > 0, grad * ratio, grad) * scale


def test_cloud_forward_backward_and_target_alpha_are_todays():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(96, 429, generator=g) * 2 - 1
    std = torch.where(torch.rand(96, 1, generator=g) < 0.5, torch.rand(96, 1, generator=g), 0)
    rk, ck = _keys(True)
    grad_out = torch.rand(96, 429, generator=g)
    want_out, want_grad = _todays_cloud(cos, std, rk, ck, 64.0, grad_out)
    cos.requires_grad_(True)
    out = feature_cloud.Cloud(std, rk, ck).block_logits(cos, 64.0)
    out.backward(grad_out)
    assert torch.equal(out, want_out) and torch.equal(cos.grad, want_grad)
    col = torch.arange(96) * 4 % 429
    alpha_t = feature_cloud.Cloud(std, rk, ck).target_alpha(col, 429)
    want = (std * _todays_gauss(rk, ck)).gather(1, col.view(-1, 1)).view(-1)
    assert torch.equal(alpha_t, torch.where(std.view(-1) > 0, want, torch.zeros_like(want)))


@pytest.mark.parametrize("rows,cols,share,per_logit", [
    (64, 2000, 0.1, True), (7, 37, 1.0, True), (5, 1001, 0.0, True), (33, 17, 0.3, False),
    (1, 16, 1.0, True)])
def test_cloud_on_perturbed_rows_only_has_the_whole_block_bits(rows, cols, share, per_logit):
    """The CPU cloud computes the angle, its cosine and sine and the backward factor on the
    perturbed rows alone; output and gradient keep the bits of the whole-block formulas, for
    any share of perturbed rows (none, some, all), block widths that are not a multiple of the
    vector width, the arccos clamp's edges, and one noise value per row (col_key [1, 1])."""
    g = torch.Generator().manual_seed(rows * cols)
    cos = torch.rand(rows, cols, generator=g) * 2 - 1
    cos[0, :2] = torch.tensor([1.0, -1.0])[:cols]
    std = torch.where(torch.rand(rows, 1, generator=g) < share,
                      torch.rand(rows, 1, generator=g) + 0.01, torch.zeros(rows, 1))
    ids = torch.arange(5, 5 + 3 * cols, 3, dtype=torch.int64)
    rk, ck = noise.noise_keys(99, torch.tensor(3, dtype=torch.int64), rows,
                              ids if per_logit else None)
    grad_out = torch.rand(rows, cols, generator=g)
    want_out, want_grad = _todays_cloud(cos, std, rk, ck, 30.0, grad_out)
    cos.requires_grad_(True)
    out = feature_cloud.Cloud(std, rk, ck).block_logits(cos, 30.0)
    out.backward(grad_out)
    assert torch.equal(out, want_out) and torch.equal(cos.grad, want_grad)
