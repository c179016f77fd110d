"""Margins and the LEAP angle perturbation on cosine logits: values, gradients, +-1 edges."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from facetrain.config import MarginConfig
from facetrain.heads.margins import _CloudCos, margin_logits, target_cos


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


def test_cloud_gradient_matches_autograd_of_the_formula():
    cos = _cos(4, 6, seed=1).requires_grad_()
    alpha = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3
    pert = torch.tensor([[True], [False], [True], [True]])
    out = _CloudCos.apply(cos, alpha, pert)
    w = torch.randn(4, 6, dtype=torch.float64)
    (out * w).sum().backward()
    c2 = cos.detach().clone().requires_grad_()
    ref = torch.where(pert, torch.cos(torch.clamp(torch.acos(c2) + alpha, 0, math.pi)), c2)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cos.grad, c2.grad)


def test_finite_at_plus_minus_one():
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0]], requires_grad=True)
    col = torch.tensor([0, 0, 2])
    local = torch.ones(3, dtype=torch.bool)
    for kind in ("cosface", "arcface", "combined"):
        for alpha in (None, torch.full((3, 3), 0.4), torch.full((3, 3), -0.4), torch.full((3, 1), 3.5)):
            cos.grad = None
            pert = None if alpha is None else torch.ones(3, 1, dtype=torch.bool)
            out = margin_logits(cos, col, local, MarginConfig(kind, 64.0, 0.35, 0.5), alpha, pert)
            loss = torch.nn.functional.cross_entropy(out, col)
            loss.backward()
            assert torch.isfinite(out).all() and torch.isfinite(loss), kind
            assert torch.isfinite(cos.grad).all(), (kind, alpha)
            # Clipped angles stay in [0, pi]: logits within [-s - s*m, s].
            assert out.abs().max() <= 64.0 * 1.35 + 1e-4


@pytest.mark.gpu
def test_fused_cloud_on_cuda_matches_eager(monkeypatch):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cos = torch.rand(64, 1000, generator=g, device=dev) * 2 - 1
    cos[0, :3] = torch.tensor([1.0, -1.0, 1.0], device=dev)
    alpha = torch.randn(64, 1000, generator=g, device=dev) * 0.3
    pert = torch.rand(64, 1, generator=g, device=dev) > 0.3
    w = torch.randn(64, 1000, generator=g, device=dev)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("FACETRAIN_COMPILE_LEAP", flag)
        c = cos.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # a compile failure would warn and fall back
            out = _CloudCos.apply(c, alpha, pert)
            (out * w).sum().backward()
        results.append((out.detach(), c.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(results[1][1]).all()
