"""The trainer runs the arcface_torch backbones from a config: MobileFaceNet, and a ViT with patch
masking, drop path and activation checkpointing; the export loads back by name. A ViT option on
a backbone without it is one clear error."""
from __future__ import annotations

import pytest
import torch

from test_train_data import make_tiny_rec, tiny_config
from facetrain.dist import SetupFailedError, single_process
from facetrain.eval.embed import load_backbone_with_info
from facetrain.trainer import Trainer


@pytest.mark.parametrize("extra", [
    ["model.backbone=mbf"],
    ["model.backbone=vit_t", "model.mask_ratio=0.5", "model.drop_path=0.2",
     "model.activation_checkpointing=true", "data.image_size=18"],
])
def test_trainer_runs_the_backbone_and_exports_it(tmp_path, extra):
    rec = make_tiny_rec(tmp_path / "data")
    cfg = tiny_config(rec, tmp_path / "run", ["leap.mode=off", "train.max_steps=3",
                                              "train.epochs=1", *extra])
    result = Trainer(cfg, single_process()).fit()
    assert result["step"] == 3 and torch.isfinite(torch.tensor(result["loss"]))
    model, info = load_backbone_with_info(tmp_path / "run" / "export" / "backbone.pt")
    assert info["backbone"] == cfg.model.backbone
    size = cfg.data.image_size
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 32)


def test_vit_option_on_a_cnn_is_a_clear_error(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    cfg = tiny_config(rec, tmp_path / "run", ["model.mask_ratio=0.1"])
    with pytest.raises(SetupFailedError, match=r"backbone 'tiny' does not take argument\(s\) "
                                               r"mask_ratio"):
        Trainer(cfg, single_process())
