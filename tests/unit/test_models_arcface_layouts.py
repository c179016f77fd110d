"""iresnet200, MobileFaceNet and the ViTs have arcface_torch's state_dict keys, order and shapes.

The expected lists are generated here from arcface_torch's architecture as written down below
(deepinsight/insightface recognition/arcface_torch/backbones/{iresnet,mobilefacenet,vit}.py
@7fadd42), not from facetrain's modules, so a published checkpoint's `load_state_dict(strict=True)`
succeeds iff these tests pass."""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from facetrain.models import build_backbone

Rows = List[Tuple[str, Tuple[int, ...]]]


def _bn(p: str, c: int) -> Rows:
    return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)),
            (f"{p}.running_var", (c,)), (f"{p}.num_batches_tracked", ())]


# --- iresnet: stem conv1/bn1/prelu; IBasicBlock bn1 conv1 bn2 prelu conv2 bn3 [downsample];
#     bn2, fc (512*7*7 -> 512), features (BN1d) ------------------------------------------------
def _iresnet_rows(layers: Tuple[int, ...]) -> Rows:
    rows: Rows = [("conv1.weight", (64, 3, 3, 3))] + _bn("bn1", 64) + [("prelu.weight", (64,))]
    cin = 64
    for s, (n, c) in enumerate(zip(layers, (64, 128, 256, 512))):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            rows += _bn(f"{p}.bn1", cin) + [(f"{p}.conv1.weight", (c, cin, 3, 3))]
            rows += _bn(f"{p}.bn2", c) + [(f"{p}.prelu.weight", (c,)),
                                          (f"{p}.conv2.weight", (c, c, 3, 3))] + _bn(f"{p}.bn3", c)
            if i == 0:   # every stage starts with stride 2: 1x1 conv + BN shortcut
                rows += [(f"{p}.downsample.0.weight", (c, cin, 1, 1))] + _bn(f"{p}.downsample.1", c)
            cin = c
    rows += _bn("bn2", 512) + [("fc.weight", (512, 512 * 7 * 7)), ("fc.bias", (512,))]
    return rows + _bn("features", 512)


# --- MobileFaceNet: ConvBlock = layers.{0 conv, 1 BN, 2 PReLU}; LinearBlock = layers.{0, 1};
#     DepthWise(cin, cout, g) = layers.{0 ConvBlock 1x1 cin->g, 1 ConvBlock 3x3 grouped g,
#     2 LinearBlock 1x1 g->cout}; Residual(c, n, g) = layers.{0..n-1 DepthWise(c, c, g)} ----------
def _convblock(p: str, cin: int, cout: int, k: int, groups: int = 1) -> Rows:
    return ([(f"{p}.layers.0.weight", (cout, cin // groups, k, k))] + _bn(f"{p}.layers.1", cout)
            + [(f"{p}.layers.2.weight", (cout,))])


def _linearblock(p: str, cin: int, cout: int, k: int, groups: int = 1) -> Rows:
    return [(f"{p}.layers.0.weight", (cout, cin // groups, k, k))] + _bn(f"{p}.layers.1", cout)


def _depthwise(p: str, cin: int, cout: int, g: int) -> Rows:
    return (_convblock(f"{p}.layers.0", cin, g, 1) + _convblock(f"{p}.layers.1", g, g, 3, g)
            + _linearblock(f"{p}.layers.2", g, cout, 1))


def _residual(p: str, c: int, n: int, g: int) -> Rows:
    return [r for i in range(n) for r in _depthwise(f"{p}.layers.{i}", c, c, g)]


def _mbf_rows(blocks: Tuple[int, ...], scale: int, emb: int = 512) -> Rows:
    c1, c2 = 64 * scale, 128 * scale
    rows = _convblock("layers.0", 3, c1, 3)
    rows += (_convblock("layers.1", c1, c1, 3, groups=64) if blocks[0] == 1
             else _residual("layers.1", c1, blocks[0], 128))
    rows += _depthwise("layers.2", c1, c1, 128) + _residual("layers.3", c1, blocks[1], 128)
    rows += _depthwise("layers.4", c1, c2, 256) + _residual("layers.5", c2, blocks[2], 256)
    rows += _depthwise("layers.6", c2, c2, 512) + _residual("layers.7", c2, blocks[3], 256)
    rows += _convblock("conv_sep", c2, 512, 1)
    rows += _linearblock("features.layers.0", 512, 512, 7, groups=512)   # GDC 7x7 depthwise
    return rows + [("features.layers.2.weight", (emb, 512))] + _bn("features.layers.3", emb)


# --- ViT: pos_embed, mask_token, patch_embed.proj (9x9 conv, bias), blocks.i.{norm1, norm2,
#     attn.qkv (no bias), attn.proj, mlp.fc1 (4D), mlp.fc2}, norm, feature.{0 Linear 144D->D,
#     1 BN1d, 2 Linear D->E, 3 BN1d} ----------------------------------------------------------
def _vit_rows(dim: int, depth: int, emb: int = 512, patches: int = 144) -> Rows:
    rows: Rows = [("pos_embed", (1, patches, dim)), ("mask_token", (1, 1, dim)),
                  ("patch_embed.proj.weight", (dim, 3, 9, 9)), ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        p = f"blocks.{i}"
        rows += [(f"{p}.norm1.weight", (dim,)), (f"{p}.norm1.bias", (dim,)),
                 (f"{p}.norm2.weight", (dim,)), (f"{p}.norm2.bias", (dim,)),
                 (f"{p}.attn.qkv.weight", (3 * dim, dim)),
                 (f"{p}.attn.proj.weight", (dim, dim)), (f"{p}.attn.proj.bias", (dim,)),
                 (f"{p}.mlp.fc1.weight", (4 * dim, dim)), (f"{p}.mlp.fc1.bias", (4 * dim,)),
                 (f"{p}.mlp.fc2.weight", (dim, 4 * dim)), (f"{p}.mlp.fc2.bias", (dim,))]
    rows += [("norm.weight", (dim,)), ("norm.bias", (dim,)),
             ("feature.0.weight", (dim, dim * patches))] + _bn("feature.1", dim)
    return rows + [("feature.2.weight", (emb, dim))] + _bn("feature.3", emb)


EXPECTED = {
    "iresnet200": lambda: _iresnet_rows((6, 26, 60, 6)),
    "mbf": lambda: _mbf_rows((1, 4, 6, 2), 2),
    "mbf_large": lambda: _mbf_rows((2, 8, 12, 4), 4),
    "vit_t": lambda: _vit_rows(256, 12),
    "vit_s": lambda: _vit_rows(512, 12),
    "vit_b": lambda: _vit_rows(512, 24),
    "vit_l": lambda: _vit_rows(768, 24),
}


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_backbone(name, **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_keys_order_and_shapes_match_arcface_torch(name: str) -> None:
    expected = EXPECTED[name]()
    got = [(k, tuple(v.shape)) for k, v in _meta(name, embedding_size=512,
                                                 image_size=112).state_dict().items()]
    missing = sorted({k for k, _ in expected} - {k for k, _ in got})
    extra = sorted({k for k, _ in got} - {k for k, _ in expected})
    assert (missing, extra) == ([], [])
    assert got == expected   # same order and shapes


def test_parameter_counts() -> None:
    """Trainable + frozen parameters, summed from the expected shapes (no buffers)."""
    counts = {}
    for name in EXPECTED:
        model = _meta(name)
        counts[name] = sum(p.numel() for p in model.parameters())
        want = sum(torch.Size(s).numel() for k, s in EXPECTED[name]()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert counts[name] == want, name
    assert counts == {"iresnet200": 118_833_920, "mbf": 2_059_520, "mbf_large": 6_314_880,
                      "vit_t": 19_137_792, "vit_s": 76_023_296, "vit_b": 113_833_472,
                      "vit_l": 255_684_352}


def test_a_state_dict_written_by_the_layout_loads_strictly() -> None:
    """A checkpoint shaped as arcface_torch writes it (random tensors of the listed shapes)
    loads with strict=True and changes the outputs."""
    rows = _mbf_rows((1, 4, 6, 2), 2)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.tensor(7) if not s else torch.rand(s, generator=gen) * 0.2 + 0.9
              if "running_var" in k or k.endswith("weight") and "layers.1" in k
              else torch.randn(s, generator=gen) * 0.05) for k, s in rows}
    model = build_backbone("mbf")
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
