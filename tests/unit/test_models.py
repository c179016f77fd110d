"""Registry and behaviour shared by every backbone: shapes, train/eval, channels_last, autocast,
torch.compile tracing, errors."""
from __future__ import annotations

import pytest
import torch

from facetrain.config import ConfigError
from facetrain.models import available, build_backbone, register

# Smallest input each backbone accepts cheaply: name -> (image_size, embedding_size).
SMALL = {"iresnet18": (32, 512), "iresnet34": (32, 512), "iresnet50": (32, 512),
         "iresnet100": (32, 512), "iresnet_tiny": (32, 128), "tiny": (48, 128),
         "resnet50_reid": ((64, 32), 2048)}
CHEAP = ["tiny", "iresnet_tiny", "iresnet18", "resnet50_reid"]
# arcface_torch's other backbones, tested in test_models_arcface_backbones.py (behaviour) and
# test_models_arcface_layouts.py (checkpoint layout).
ARCFACE_FAMILY = {"iresnet200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b", "vit_l"}


def _build(name: str, dropout: float = 0.0) -> torch.nn.Module:
    """A backbone whose BN running statistics come from one batch, as after some training.

    Fresh running statistics (mean 0, var 1) with InsightFace's N(0, 0.1) conv init let eval-mode
    activations grow through every residual block (to inf in iresnet100); training avoids that
    by construction, and so does this calibration."""
    torch.manual_seed(0)
    size, emb = SMALL[name]
    model = build_backbone(name, embedding_size=emb, dropout=dropout, image_size=size)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0  # running stats := this batch's stats
    with torch.no_grad():
        model.train()(_input(name, batch=8, seed=3))
    for m in bns:
        m.momentum = 0.1
    return model


def _input(name: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    size = SMALL[name][0]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_available_lists_every_shipped_backbone() -> None:
    assert available() == sorted(set(SMALL) | ARCFACE_FAMILY)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shape_and_embedding_size_attribute(name: str) -> None:
    model = _build(name).eval()
    with torch.no_grad():
        out = model(_input(name, batch=2))
    assert out.shape == (2, SMALL[name][1]) and out.dtype == torch.float32
    assert model.embedding_size == SMALL[name][1]
    assert torch.isfinite(out).all()


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError,
                       match=r"'iresnet51'.*iresnet18, iresnet200, iresnet34.*mbf.*tiny.*vit_t"):
        build_backbone("iresnet51", embedding_size=512)


def test_unknown_argument_lists_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"does not take argument\(s\) widht.*embedding_size"):
        build_backbone("tiny", widht=3)


def test_duplicate_registration_is_an_error() -> None:
    available()  # load the built-ins first
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        register("tiny")(lambda **kw: torch.nn.Identity())


@pytest.mark.parametrize("name", ["tiny", "iresnet18"])
def test_dropout_active_in_train_only(name: str) -> None:
    model = _build(name, dropout=0.5)
    x = _input(name)
    model.train()
    assert not torch.allclose(model(x), model(x))           # two dropout masks
    model.eval()
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x), full)            # deterministic
        torch.testing.assert_close(model(x[1:2]), full[1:2], rtol=1e-4, atol=1e-4)  # per sample


@pytest.mark.parametrize("name", CHEAP)
def test_batchnorm_statistics_update_in_train_only(name: str) -> None:
    model = _build(name)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
    before = bn.running_mean.clone()
    model.eval()
    with torch.no_grad():
        model(_input(name))
    torch.testing.assert_close(bn.running_mean, before)
    model.train()
    with torch.no_grad():
        model(_input(name))
    assert not torch.allclose(bn.running_mean, before)


@pytest.mark.parametrize("name", CHEAP)
def test_channels_last_gives_the_same_output(name: str) -> None:
    model = _build(name).eval()
    x = _input(name)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # fp32 summation order differs between the two layouts; 50 layers amplify it to ~1e-4.
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", CHEAP)
def test_bf16_autocast_forward_and_backward(name: str) -> None:
    model = _build(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_input(name))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_torch_compile_traces_without_graph_breaks() -> None:
    """fullgraph=True fails on any graph break (the input-size check, the autocast branch);
    the eager backend keeps this fast on CPU. Inductor is exercised by the GPU benchmark."""
    model = _build("tiny").train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = _input("tiny")
    out = compiled(x)
    out.square().mean().backward()
    with torch.no_grad():  # no dropout: train-mode outputs are deterministic
        torch.testing.assert_close(out.detach(), model.forward(x), rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x).dtype == torch.float32
