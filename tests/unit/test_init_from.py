"""model.init_from: the three sources load, mismatches are refused with the exact listing, files
are read without running code, the sha256 is the file's; optim.backbone_lr_scale."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from facetrain import export
from facetrain.config import ConfigError, ScheduleConfig
from facetrain.models import build_backbone
from facetrain.models.init_from import init_from_path, read_init_source
from facetrain.optim import LRSchedule


def _tiny(emb: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("tiny", embedding_size=emb, image_size=32)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, skip: tuple = ()) -> None:
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        if not k.startswith(skip):
            assert torch.equal(v, w), k


@pytest.mark.parametrize("prefix", ["", "module."])
def test_insightface_pth_state_dict_loads(tmp_path: Path, prefix: str) -> None:
    """arcface_torch saves `backbone.module.state_dict()` with torch.save; a DDP-wrapped save
    has a `module.` prefix on every key."""
    src = _tiny(seed=1)
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, tmp_path / "model.pt")
    dst = _tiny(seed=2)
    source, skipped = init_from_path(dst, tmp_path / "model.pt", "tiny")
    assert skipped == [] and source.kind == "insightface"
    _assert_same(dst, src)
    assert source.sha256 == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()


def test_facetrain_export_loads(tmp_path: Path) -> None:
    src = _tiny(seed=1)
    paths = export.export_backbone(src, "tiny", {"embedding_size": 16, "image_size": 32},
                                   tmp_path, image_size=32, onnx=False)
    dst = _tiny(seed=2)
    source, _ = init_from_path(dst, paths["torch"], "tiny")
    assert source.kind == "export"
    _assert_same(dst, src)


def test_shape_mismatch_is_refused_with_the_list(tmp_path: Path) -> None:
    torch.save(_tiny(emb=32).state_dict(), tmp_path / "r.pth")
    dst = _tiny(emb=16, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    msg = (f"model.init_from={tmp_path / 'r.pth'} does not match model.backbone=tiny (check the "
           "backbone name, model.embedding_size and data.image_size): shape differs (file vs "
           "backbone) (6): fc.weight [32, 512] vs [16, 512], fc.bias [32] vs [16], features.weight "
           "[32] vs [16], features.bias [32] vs [16], features.running_mean [32] vs [16], "
           "features.running_var [32] vs [16]; model.init_allow_missing_final=true accepts a "
           "missing or reshaped final layer (fc, features)")
    with pytest.raises(ConfigError, match=re.escape(msg) + "$"):
        init_from_path(dst, tmp_path / "r.pth", "tiny")
    for k, v in dst.state_dict().items():          # nothing was half-loaded
        assert torch.equal(v, before[k]), k


def test_missing_final_layer_allowed_only_when_asked(tmp_path: Path) -> None:
    src = _tiny(emb=32, seed=1)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    dst = _tiny(emb=16, seed=2)
    fresh_fc = dst.fc.weight.detach().clone()
    _, skipped = init_from_path(dst, tmp_path / "r.pth", "tiny", allow_missing_final=True)
    assert skipped == ["fc.bias", "fc.weight", "features.bias", "features.running_mean",
                       "features.running_var", "features.weight"]
    _assert_same(dst, src, skip=("fc.", "features."))
    assert torch.equal(dst.fc.weight, fresh_fc)
    # a missing final layer (dropped from the file) is allowed the same way
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("fc.")},
               tmp_path / "nofc.pth")
    init_from_path(_tiny(emb=32), tmp_path / "nofc.pth", "tiny", allow_missing_final=True)
    # but not a missing trunk layer
    sd = dict(src.state_dict())
    del sd["layer1.0.bn1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "holes.pth")
    with pytest.raises(ConfigError, match=re.escape(
            "missing in the file (1): layer1.0.bn1.weight; not in the backbone (1): "
            "extra.weight") + "$"):
        init_from_path(_tiny(emb=32), tmp_path / "holes.pth", "tiny", allow_missing_final=True)


class _Payload:
    """Unpickling this would create `marker` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_files_are_read_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match=r"evil\.pth cannot be read as plain tensors"):
        read_init_source(tmp_path / "evil.pth")
    assert not marker.exists()


def test_not_a_state_dict_and_missing_file(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"list\.pt holds no backbone state_dict"):
        read_init_source(tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"model\.init_from=.*nope\.pth does not exist"):
        read_init_source(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a facetrain checkpoint"):
        read_init_source(tmp_path / "empty")


def test_expected_sha256_is_checked(tmp_path: Path) -> None:
    torch.save(_tiny().state_dict(), tmp_path / "r.pth")
    with pytest.raises(ConfigError, match="has sha256 [0-9a-f]{64}, not model.init_from_sha256=ab"):
        init_from_path(_tiny(), tmp_path / "r.pth", "tiny", expect_sha256="ab")


def test_backbone_lr_scale_scales_the_first_optimizer_only() -> None:
    sched = LRSchedule(ScheduleConfig(name="constant"), 0.4, steps_per_epoch=10, total_steps=10)
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert sched.apply([a, b], 0, scales=(0.25, 1.0)) == 0.4
    assert a.param_groups[0]["lr"] == 0.4 * 0.25 and b.param_groups[0]["lr"] == 0.4
    sched.apply([a, b], 1)
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"] == 0.4
