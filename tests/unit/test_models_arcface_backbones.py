"""Behaviour of mbf, mbf_large, iresnet200 and the ViTs: forward + backward in fp32 and bf16,
ViT patch masking and drop path against their definitions, a ViT block against a float64
reference written from the transformer equations, and loading in the evaluators."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facetrain import export
from facetrain.eval import embed
from facetrain.models import build_backbone
from facetrain.models.vit import Block, DropPath

# name -> a small input size it accepts (ViTs: 4 x 3 patches of 9)
SMALL = {"mbf": 32, "mbf_large": 32, "iresnet200": 16, "vit_t": (36, 27), "vit_s": (36, 27),
         "vit_b": (36, 27), "vit_l": (36, 27)}


def _hw(size) -> tuple:
    return (size, size) if isinstance(size, int) else tuple(size)


def _small_model(name: str, **kw) -> torch.nn.Module:
    """The backbone with its real widths and block types; the deepest ones keep two blocks per
    stage (built on the meta device, trimmed, then initialised), so each test takes seconds."""
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=16, image_size=SMALL[name], **kw)
    if name == "iresnet200":
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            setattr(model, stage, getattr(model, stage)[:2])
    elif name.startswith("vit") and name != "vit_t":
        model.blocks = model.blocks[:2]
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model._init_weights()
    return model


def _x(name: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    h, w = _hw(SMALL[name])
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward(name: str, precision: str) -> None:
    model = _small_model(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(_x(name))
    assert out.shape == (4, 16) and out.dtype == torch.float32   # the head runs in fp32
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_eval_is_deterministic_and_per_sample(name: str) -> None:
    model = _small_model(name).eval()
    x = _x(name)
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x), full)
        torch.testing.assert_close(model(x[2:3]), full[2:3], rtol=1e-4, atol=1e-5)


def test_vit_masking_replaces_a_fixed_share_of_tokens_by_the_mask_token() -> None:
    """Training with mask_ratio r: the blocks see int(N (1 - r)) tokens; after the final norm the
    other N - int(N (1 - r)) positions of each sample hold exactly `mask_token`."""
    model = _small_model("vit_t", mask_ratio=0.25).train()
    n = model.num_patches
    assert n == 12
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(tokens=a[0].shape[1]))
    model.feature.register_forward_pre_hook(lambda m, a: seen.update(flat=a[0]))
    with torch.no_grad():
        model(_x("vit_t"))
    assert seen["tokens"] == int(12 * 0.75) == 9
    rows = seen["flat"].reshape(4, n, model.embed_dim)
    is_mask = (rows == model.mask_token.reshape(1, 1, -1)).all(dim=-1)
    assert is_mask.sum(dim=1).tolist() == [3, 3, 3, 3]
    assert len({tuple(r.tolist()) for r in is_mask}) > 1            # per-sample positions
    model.eval()
    with torch.no_grad():
        model(_x("vit_t"))
    assert seen["tokens"] == 12                                     # no masking in eval


def test_vit_defaults_follow_arcface_torch() -> None:
    for name, (mask, dp) in {"vit_t": (0.1, 0.1), "vit_s": (0.1, 0.1), "vit_b": (0.1, 0.1),
                             "vit_l": (0.05, 0.05)}.items():
        with torch.device("meta"):
            model = build_backbone(name)
        depth = len(model.blocks)
        assert model.mask_ratio == mask
        # stochastic depth rises linearly from 0 (first block: no DropPath) to `dp`
        rates = [getattr(b.drop_path, "p", 0.0) for b in model.blocks]
        assert rates == pytest.approx([dp * i / (depth - 1) for i in range(depth)])
        assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)


def test_drop_path_is_per_sample_all_or_nothing_with_unchanged_mean() -> None:
    torch.manual_seed(0)
    dp = DropPath(0.3).train()
    x = torch.ones(20000, 3, 2)
    y = dp(x)
    per_sample = y.reshape(20000, -1)
    kept = per_sample[:, 0] != 0
    assert torch.all(per_sample[kept] == 1 / 0.7) and torch.all(per_sample[~kept] == 0)
    assert abs(kept.double().mean().item() - 0.7) < 0.01
    assert abs(y.double().mean().item() - 1.0) < 0.02
    assert torch.equal(dp.eval()(x), x)


def _block_reference(block: Block, x: torch.Tensor) -> torch.Tensor:
    """A pre-norm transformer block in float64 from its equations (no drop path, eval):
    h = x + W_o concat_j softmax(Q_j K_j^T / sqrt(d)) V_j,  Q|K|V = LN1(x) W_qkv^T
    out = h + W_2 relu6(W_1 LN2(h) + b_1) + b_2."""
    sd = {k: v.double() for k, v in block.state_dict().items()}
    x = x.double()

    def ln(t, p):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"] + sd[f"{p}.bias"]

    b, n, d = x.shape
    heads = block.attn.num_heads
    hd = d // heads
    qkv = ln(x, "norm1") @ sd["attn.qkv.weight"].T                   # [B, N, 3D]
    out = torch.zeros_like(x)
    for j in range(heads):
        q = qkv[..., j * hd:(j + 1) * hd]
        k = qkv[..., d + j * hd:d + (j + 1) * hd]
        v = qkv[..., 2 * d + j * hd:2 * d + (j + 1) * hd]
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., j * hd:(j + 1) * hd] = a @ v
    h = x + out @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    m = torch.clamp(ln(h, "norm2") @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"], 0, 6)
    return h + m @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]


def test_vit_block_matches_the_float64_equations() -> None:
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=8, drop_path=0.2).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 12, 32)
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got.double(), _block_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mbf", "mbf_large", "vit_t"])
def test_export_loads_in_the_evaluator(name: str, tmp_path) -> None:
    """backbone.pt (rebuilt by name from its kwargs) and backbone.onnx give the embeddings the
    trained module gives, through the evaluators' loader and feature extraction."""
    size = SMALL[name]
    kwargs = {"embedding_size": 16, "dropout": 0.0, "image_size": size}
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs)
    with torch.no_grad():   # non-trivial BN statistics
        model.train()(_x(name, batch=8, seed=5))
    model.eval()
    paths = export.export_backbone(model, name, kwargs, tmp_path, image_size=size)
    rng = np.random.default_rng(0)
    h, w = _hw(size)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    want = embed.extract_features(model, images, batch_size=2, image_size=(h, w), progress=False)
    for path in (paths["torch"], paths["onnx"]):
        loaded, info = embed.load_backbone_with_info(path)
        got = embed.extract_features(loaded, images, batch_size=2, image_size=(h, w),
                                     progress=False)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=str(path))


SHIPPED = {"ms1mv3_mbf.yaml": "mbf", "wf42m_mbf_large.yaml": "mbf_large",
           "wf42m_r200.yaml": "iresnet200", "wf42m_vit_t.yaml": "vit_t",
           "wf42m_vit_s.yaml": "vit_s", "wf42m_vit_b.yaml": "vit_b", "wf42m_vit_l.yaml": "vit_l"}


@pytest.mark.parametrize("file", sorted(SHIPPED))
def test_shipped_config_builds_its_backbone(file: str) -> None:
    """Each shipped config builds its backbone with the trainer's kwargs, with the ViT options
    of arcface_torch's WebFace42M recipes (drop path 0.05; masking 0 for T/S, 0.05 for B/L)."""
    from pathlib import Path
    from facetrain.config import load_config
    from facetrain.trainer import backbone_kwargs
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / file)
    assert cfg.model.backbone == SHIPPED[file]
    export_kw, build_kw = backbone_kwargs(cfg)
    assert "activation_checkpointing" not in export_kw
    with torch.device("meta"):
        model = build_backbone(cfg.model.backbone, **build_kw)
    assert model.embedding_size == 512 and model.image_size == (112, 112)
    if file.startswith("wf42m_vit"):
        assert model.mask_ratio == (0.05 if file[-6] in "bl" else 0.0)
        assert model.blocks[-1].drop_path.p == pytest.approx(0.05)
        assert model.activation_checkpointing == (file[-6] in "bl")
