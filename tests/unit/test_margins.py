"""Margins and the LEAP angle perturbation on cosine logits: values, gradients, +-1 edges."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from facetrain.config import MarginConfig
from facetrain.heads.feature_cloud import Cloud, _CloudCos
from facetrain.heads.margins import margin_logits, target_cos
from facetrain.heads.noise import gauss, noise_keys


def _cos(n=5, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, generator=g, dtype=torch.float64) * 1.8 - 0.9


def test_cosface_arcface_combined_values():
    cos = _cos()
    col = torch.tensor([0, 3, 6, 2, 1])
    local = torch.tensor([True, True, False, True, True])
    for kind, mc, ma in (("cosface", 0.35, 0.0), ("arcface", 0.0, 0.5), ("combined", 0.2, 0.3)):
        m = MarginConfig(kind, 64.0, 0.35 if kind == "cosface" else 0.2, 0.5 if kind == "arcface" else 0.3)
        out = margin_logits(cos, col, local, m)
        expect = 64.0 * cos.clone()
        for r in range(5):
            if local[r]:
                th = math.acos(cos[r, col[r]].item())
                expect[r, col[r]] = 64.0 * (math.cos(min(max(th + ma, 0), math.pi)) - mc)
        torch.testing.assert_close(out, expect)


def test_cosface_without_perturbation_is_exact():
    cos = _cos().float()
    col = torch.arange(5)
    out = margin_logits(cos, col, torch.ones(5, dtype=torch.bool), MarginConfig("cosface", 10.0, 0.3, 0.0))
    assert torch.equal(out[torch.arange(5), col], (cos[torch.arange(5), col] - 0.3) * 10.0)
    other = torch.ones_like(cos, dtype=torch.bool)
    other[torch.arange(5), col] = False
    assert torch.equal(out[other], cos[other] * 10.0)


def test_margin_gradient_is_the_exact_derivative():
    # Not straight-through: d/dcos of s*cos(theta + m) is s*sin(theta + m)/sin(theta).
    cos = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    out = target_cos(cos, torch.zeros(2, dtype=torch.float64), 0.0, 0.5)
    out.sum().backward()
    th = torch.acos(cos.detach())
    torch.testing.assert_close(cos.grad, torch.sin(th + 0.5) / torch.sin(th))


def _cloud(rows, cols, std, granularity="logit", counter=0):
    ids = torch.arange(100, 100 + cols) if granularity == "logit" else None
    row_key, col_key = noise_keys(11, torch.tensor(counter), rows, ids)
    return Cloud(torch.as_tensor(std, dtype=torch.float32).view(-1, 1), row_key, col_key)


def test_cloud_gradient_matches_autograd_of_the_formula():
    cos = _cos(4, 6, seed=1).float().requires_grad_()
    cloud = _cloud(4, 6, [0.3, 0.0, 0.2, 0.5])
    out = _CloudCos.apply(cos, cloud.std, cloud.row_key, cloud.col_key, 1.0)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    c2 = cos.detach().clone().requires_grad_()
    alpha = cloud.std * gauss(cloud.row_key, cloud.col_key)
    ref = torch.where(cloud.std > 0, torch.cos(torch.clamp(torch.acos(c2) + alpha, 0, math.pi)), c2)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cos.grad, c2.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[1], cos[1].detach())             # std 0: untouched


def test_finite_at_plus_minus_one():
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0]], requires_grad=True)
    col = torch.tensor([0, 0, 2])
    local = torch.ones(3, dtype=torch.bool)
    clouds = [None, _cloud(3, 3, [0.4, 0.4, 0.4]), _cloud(3, 3, [2.0, 2.0, 2.0], counter=5),
              _cloud(3, 3, [3.5, 3.5, 3.5], granularity="sample")]
    for kind in ("cosface", "arcface", "combined"):
        for cloud in clouds:
            cos.grad = None
            out = margin_logits(cos, col, local, MarginConfig(kind, 64.0, 0.35, 0.5), cloud)
            loss = torch.nn.functional.cross_entropy(out, col)
            loss.backward()
            assert torch.isfinite(out).all() and torch.isfinite(loss), kind
            assert torch.isfinite(cos.grad).all(), kind
            # Clipped angles stay in [0, pi]: logits within [-s - s*m, s].
            assert out.abs().max() <= 64.0 * 1.35 + 1e-4


def test_noise_is_standard_normal_and_keyed_by_class_not_position():
    rk, ck = noise_keys(5, torch.tensor(2), 500, torch.arange(1000))
    z = gauss(rk, ck)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z ** 4).mean().item() - 3) < 0.05                  # Gaussian kurtosis
    _, ck2 = noise_keys(5, torch.tensor(2), 500, torch.arange(600, 1000))
    assert torch.equal(gauss(rk, ck2), z[:, 600:])                 # same class -> same angle
    rk3, ck3 = noise_keys(5, torch.tensor(3), 500, torch.arange(1000))
    assert abs(torch.corrcoef(torch.stack([z.flatten(), gauss(rk3, ck3).flatten()]))[0, 1]) < 0.01


@pytest.mark.gpu
def test_fused_cloud_on_cuda_matches_eager(monkeypatch):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cos = torch.rand(64, 1000, generator=g, device=dev) * 2 - 1
    cos[0, :3] = torch.tensor([1.0, -1.0, 1.0], device=dev)
    std = (torch.rand(64, 1, generator=g, device=dev) - 0.3).clamp(min=0)
    row_key, col_key = noise_keys(3, torch.tensor(7, device=dev), 64, torch.arange(1000, device=dev))
    w = torch.randn(64, 1000, generator=g, device=dev)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("FACETRAIN_COMPILE_LEAP", flag)
        c = cos.clone().requires_grad_()
        with warnings.catch_warnings():
            # A compile failure warns and falls back to eager: make that an error here.
            warnings.filterwarnings("error", message="LEAP: torch.compile")
            out = _CloudCos.apply(c, std, row_key, col_key, 3.0)
            (out * w).sum().backward()
        results.append((out.detach(), c.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(results[1][1]).all()
    # Keys are integer hashes: the CUDA noise equals the CPU noise.
    torch.testing.assert_close(gauss(row_key, col_key).cpu(), gauss(row_key.cpu(), col_key.cpu()))
