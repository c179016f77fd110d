"""IResNet matches InsightFace's checkpoint layout: pinned key list, shapes, parameter counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facetrain.config import ConfigError
from facetrain.models import build_backbone

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "iresnet_keys_iresnet50.txt"

# Parameter counts of InsightFace's arcface_torch iresnet{18,34,50,100} at 112x112 / 512-d
# (counted from their code; the model zoo quotes r50 43.6M and r100 65.2M).
KNOWN_PARAMS = {"iresnet18": 24_025_600, "iresnet34": 34_139_328,
                "iresnet50": 43_590_848, "iresnet100": 65_156_160}


def _read_fixture() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in FIXTURE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, shape = line.partition(" ")
        rows.append((key, tuple(int(s) for s in shape.split(",") if s.strip())))
    return rows


def _meta_backbone(name: str, **kw) -> torch.nn.Module:
    # Meta tensors: shapes and keys without allocating or initialising 65M parameters.
    with torch.device("meta"):
        return build_backbone(name, **kw)


def test_iresnet50_state_dict_keys_and_shapes_match_insightface() -> None:
    expected = _read_fixture()
    assert len(expected) == 475
    model = _meta_backbone("iresnet50", embedding_size=512, image_size=112)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert [k for k, _ in got] == [k for k, _ in expected]   # same keys, same order
    assert got == expected                                   # and the same shapes


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_parameter_counts(name: str) -> None:
    model = _meta_backbone(name, embedding_size=512, image_size=112)
    assert sum(p.numel() for p in model.parameters()) == KNOWN_PARAMS[name]
    # InsightFace fixes the BN1d scale at 1: the only frozen parameter.
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["features.weight"]


def test_fc_input_follows_image_size() -> None:
    model = _meta_backbone("iresnet18", embedding_size=128, image_size=(64, 32))
    assert tuple(model.fc.weight.shape) == (128, 512 * 4 * 2)
    assert model.embedding_size == 128


@pytest.mark.parametrize("size", [50, 8, (64, 40)])
def test_image_size_not_divisible_by_16_is_a_clear_error(size) -> None:
    with pytest.raises(ConfigError, match=r"iresnet50 needs input sides divisible by 16.*"
                                          r"data\.image_size"):
        build_backbone("iresnet50", image_size=size)


def test_wrong_input_size_at_forward_names_the_built_size() -> None:
    model = build_backbone("iresnet18", embedding_size=8, image_size=32).eval()
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.zeros(1, 3, 48, 48))


def test_fp32_head_under_autocast() -> None:
    """Under bf16 autocast the trunk runs in bf16 but fc + BN1d in fp32 (InsightFace's choice)."""
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_size=16, image_size=32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = model(x)
    seen = {}
    model.fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0].dtype, fc=o.dtype))
    model.bn2.register_forward_hook(lambda m, i, o: seen.update(trunk=i[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen == {"trunk": torch.bfloat16, "fc_in": torch.float32, "fc": torch.float32}
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1 * ref.abs().max().item())
