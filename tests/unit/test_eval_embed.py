"""Feature extraction and backbone loading."""
from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facetrain.eval import embed

from test_eval_builders import png, rand_image


class ColumnNet(nn.Module):
    """Embedding = per-channel mean of the left half and of the right half of the image [N, 6]:
    simple to compute by hand and not flip invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        return torch.cat([x[..., :w].mean((2, 3)), x[..., w:].mean((2, 3))], 1)


def _reference(img_bgr: np.ndarray, size: int, flip: bool) -> np.ndarray:
    rgb = cv2.resize(img_bgr, (size, size), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    x = (rgb.astype(np.float64) / 255 - 0.5) / 0.5
    w = size // 2

    def emb(a):
        return np.r_[a[:, :w].mean((0, 1)), a[:, w:].mean((0, 1))]
    return emb(x) + (emb(x[:, ::-1]) if flip else 0)


@pytest.mark.parametrize("flip", [False, True])
def test_extract_matches_hand_preprocessing(flip):
    rng = np.random.default_rng(0)
    imgs = [rand_image(rng, 20, 12) for _ in range(5)]
    got = embed.extract_features(ColumnNet(), [png(i) for i in imgs], batch_size=2, flip=flip,
                                 image_size=8, progress=False)
    ref = np.stack([_reference(i, 8, flip) for i in imgs])
    assert got.dtype == np.float32 and got.shape == (5, 6)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_arrays_bytes_and_datasets_agree_across_batch_sizes():
    rng = np.random.default_rng(1)
    imgs = [rand_image(rng) for _ in range(7)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return imgs[i]
    a = embed.extract_features(ColumnNet(), imgs, batch_size=3, image_size=16, progress=False)
    b = embed.extract_features(ColumnNet(), [png(i) for i in imgs], batch_size=7, image_size=16,
                               progress=False)
    c = embed.extract_features(ColumnNet(), DS(), batch_size=1, image_size=16, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_undecodable_image_is_named():
    good = png(rand_image(np.random.default_rng(2)))
    with pytest.raises(embed.ImageDecodeError, match="image 2"):
        embed.extract_features(ColumnNet(), [good, good, b"not an image"], batch_size=2,
                               image_size=8, progress=False)


def test_load_backbone_torchscript_and_export_dict(tmp_path, monkeypatch):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    torch.jit.script(net).save(str(tmp_path / "ts.pt"))
    np.testing.assert_allclose(embed.load_backbone(tmp_path / "ts.pt")(x).detach(),
                               net(x).detach(), atol=1e-6)
    # the trainer's export dict, rebuilt through the registry (stubbed: any nn.Module will do)
    stub = types.ModuleType("facetrain.models.registry")
    stub.build_backbone = lambda name, **kw: nn.Sequential(nn.Flatten(), nn.Linear(kw["d"], 5))
    monkeypatch.setitem(sys.modules, "facetrain.models.registry", stub)
    torch.save({"format": "facetrain-backbone", "version": 1, "backbone": "flat",
                "kwargs": {"d": 48}, "state_dict": net.state_dict()}, tmp_path / "backbone.pt")
    model = embed.load_backbone(tmp_path / "backbone.pt")
    assert not model.training
    np.testing.assert_allclose(model(x).detach(), net(x).detach(), atol=1e-6)


def test_load_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.pt does not exist"):
        embed.load_backbone(tmp_path / "none.pt")
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="facetrain-backbone"):
        embed.load_backbone(tmp_path / "ckpt.pt")
    torch.save({"format": "facetrain-backbone", "version": 9}, tmp_path / "v9.pt")
    with pytest.raises(ValueError, match="version 9"):
        embed.load_backbone(tmp_path / "v9.pt")


def test_load_features_checks_rows(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="3 feature rows but the list lists 4"):
        embed.load_features(tmp_path / "f.npy", 4, "the list")
    assert embed.load_features(tmp_path / "f.npy", 3, "x").shape == (3, 4)
