"""model.activation_checkpointing: the same outputs, gradients and BatchNorm statistics as the
plain run, for the iresnet blocks and the ViT blocks (with drop path and masking, whose random
draws the recompute must replay); fewer saved activations."""
from __future__ import annotations

import copy

import pytest
import torch

from facetrain.models import build_backbone
from facetrain.models.iresnet import IResNet


def _pair(make):
    torch.manual_seed(0)
    plain = make(False)
    ckpt = make(True)
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def _step(model, x, seed):
    torch.manual_seed(seed)         # the same drop-path / masking draws in both runs
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).square().sum().backward()
    return out.detach()


MODELS = {
    "iresnet": lambda ac: IResNet((2, 2, 2, 1), widths=(8, 16, 16, 32), embedding_size=16,
                                  image_size=32, activation_checkpointing=ac),
    "vit": lambda ac: build_backbone("vit_t", embedding_size=16, image_size=(36, 27),
                                     mask_ratio=0.25, drop_path=0.5, activation_checkpointing=ac),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_outputs_gradients_and_batchnorm_statistics(name):
    plain, ckpt = _pair(MODELS[name])
    assert ckpt.activation_checkpointing and not plain.activation_checkpointing
    h, w = (32, 32) if name == "iresnet" else (36, 27)
    x = torch.rand(4, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(_step(ckpt, x, 7), _step(plain, x, 7), rtol=0, atol=0)
    grads = 0
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
        grads += 1
    assert grads > 10
    # one training step moves BatchNorm's running statistics once, not twice
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")


def test_eval_and_no_grad_do_not_checkpoint():
    plain, ckpt = _pair(MODELS["iresnet"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_fewer_tensors_are_saved_for_backward():
    plain, ckpt = _pair(MODELS["iresnet"])
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    sizes = {}
    for label, model in (("plain", plain), ("ckpt", ckpt)):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        sizes[label] = total[0]
    assert sizes["ckpt"] < 0.5 * sizes["plain"], sizes
