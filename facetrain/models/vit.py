"""Vision Transformers for faces (`vit_t`, `vit_s`, `vit_b`, `vit_l`) as arcface_torch builds them.

Module names, state_dict keys and shapes follow arcface_torch's `backbones/vit.py`, so its
published ViT checkpoints load with `load_state_dict(strict=True)` unchanged (the expected key list
is written down in tests/unit/test_models_vit.py). Structure at 112x112, patch 9:

    patch_embed.proj   Conv2d(3, D, 9, stride 9, bias) -> 12 x 12 = 144 tokens (the last 4
                       pixel rows/columns are not seen, as in arcface_torch)
    pos_embed          [1, 144, D] added; no class token
    (training only)    random patch masking: a `mask_ratio` share of tokens is dropped before the
                       blocks and replaced by the learned `mask_token` after them
    blocks[i]          x + drop_path(attn(norm1(x))); x + drop_path(mlp(norm2(x)))
                       attention: qkv Linear without bias, 8 heads, softmax in float32; proj
                       Linear; mlp: fc1 (4D) -> ReLU6 -> fc2. Drop-path rate rises linearly
                       from 0 to `drop_path_rate` over the blocks.
    norm               LayerNorm(D), in float32
    feature            Linear(144 D, D, no bias) -> BN1d(D) -> Linear(D, E, no bias) -> BN1d(E)

    name   D    depth heads drop path  mask ratio   (arcface_torch's names)
    vit_t  256  12    8     0.1        0.1          vit_t
    vit_s  512  12    8     0.1        0.1          vit_s
    vit_b  512  24    8     0.1        0.1          vit_b
    vit_l  768  24    8     0.05       0.05         vit_l_dp005_mask_005
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from facetrain.config import ConfigError
from facetrain.models.checkpointing import checkpointed
from facetrain.models.iresnet import ImageSize, to_hw
from facetrain.models.registry import register


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability `p` and
    scale the kept ones by 1/(1-p), so the expectation is unchanged; identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                           device=x.device).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> ReLU6 -> fc2 (arcface_torch's activation choice)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; q.k^T and the softmax run in float32 even under autocast (as
    arcface_torch), since 144-token bf16/fp16 logits lose the small attention weights."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)                     # [3, B, heads, N, d/heads]
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm, attention, MLP x4, drop path on both branches)."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution: [B, 3, H, W] -> [B, (H//p)(W//p), D]."""

    def __init__(self, image_size: Tuple[int, int], patch_size: int, dim: int) -> None:
        super().__init__()
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Face ViT: float [B, 3, H, W] in [-1, 1] -> embeddings [B, embedding_size] (after BN1d).

    Args:
        dim, depth, num_heads: width, blocks and attention heads.
        embedding_size: output dimension.
        dropout: dropout on the flattened tokens before the feature head (0 in arcface_torch;
            outside the `feature` Sequential so checkpoint keys do not move).
        image_size: input side or (H, W); at least one patch each way.
        patch_size: 9 in arcface_torch (112 // 9 = 12 patches per side).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0).
        mask_ratio: share of patch tokens dropped per sample in training (0 = off).
        activation_checkpointing: recompute each block in the backward pass instead of storing
            its activations (training only; same gradients, less memory, ~1/3 more compute).
        fp32_head: run the feature head in float32 under autocast (norm already is).
    """

    def __init__(self, dim: int, depth: int, num_heads: int = 8, embedding_size: int = 512,
                 dropout: float = 0.0, image_size: ImageSize = 112, patch_size: int = 9,
                 drop_path_rate: float = 0.1, mask_ratio: float = 0.1,
                 activation_checkpointing: bool = False, fp32_head: bool = True,
                 name: str = "vit") -> None:
        super().__init__()
        h, w = to_hw(image_size)
        if h < patch_size or w < patch_size:
            raise ConfigError(f"{name} needs input sides of at least its patch size {patch_size}; "
                              f"got data.image_size={image_size!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"{name}: model.mask_ratio must be in [0, 1); got {mask_ratio!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"{name}: model.drop_path must be in [0, 1); got {drop_path_rate!r}")
        self.image_size = (h, w)
        self.embedding_size = embedding_size
        self.embed_dim = dim
        self.mask_ratio = float(mask_ratio)
        self.activation_checkpointing = activation_checkpointing
        self.fp32_head = fp32_head
        # model.init_allow_missing_final may leave these fresh (facetrain/models/init_from.py)
        self.final_layer = ("feature.2", "feature.3")
        # Own parameters first: state_dict lists them before the children, as arcface_torch's.
        self.patch_embed = PatchEmbed((h, w), patch_size, dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(dim, num_heads, rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dropout = nn.Dropout(p=dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's: truncated normal (std 0.02, cut at +-2, absolute) for the position
        # embedding and linear weights, normal(0.02) for the mask token, zero biases, LN 1/0.
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _mask(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keep int(N * (1 - mask_ratio)) random tokens per sample (at least one); also the order
        that undoes the shuffle (kept tokens first, then the masked positions)."""
        b, n, d = x.shape
        keep = max(1, int(n * (1.0 - self.mask_ratio)))
        order = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(b, keep, d))
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] at the built image size -> [B, embedding_size]."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"VisionTransformer was built for {self.image_size[0]}x"
                             f"{self.image_size[1]} inputs (data.image_size) but got "
                             f"{tuple(x.shape)}")
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpointed(block, x)
            else:
                x = block(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.norm(x.float())
            if masking:
                fill = self.mask_token.float().expand(b, self.num_patches - x.shape[1], -1)
                x = torch.cat([x, fill], dim=1)
                x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = self.dropout(x.reshape(b, self.num_patches * self.embed_dim))
        if self.fp32_head and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.feature(x.float())
        return self.feature(x)


# name -> (width, depth, drop path, mask ratio), arcface_torch's settings.
VIT_SPECS = {"vit_t": (256, 12, 0.1, 0.1), "vit_s": (512, 12, 0.1, 0.1),
             "vit_b": (512, 24, 0.1, 0.1), "vit_l": (768, 24, 0.05, 0.05)}


def _make(name: str, embedding_size: int, dropout: float, image_size: ImageSize,
          mask_ratio: float | None, drop_path: float | None, activation_checkpointing: bool,
          fp32_head: bool) -> VisionTransformer:
    dim, depth, dp, mr = VIT_SPECS[name]
    return VisionTransformer(
        dim, depth, 8, embedding_size, dropout, image_size, 9,
        dp if drop_path is None else drop_path, mr if mask_ratio is None else mask_ratio,
        activation_checkpointing, fp32_head, name)


@register("vit_t")
def vit_t(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
          mask_ratio: float | None = None, drop_path: float | None = None,
          activation_checkpointing: bool = False, fp32_head: bool = True) -> VisionTransformer:
    """ViT-T: width 256, 12 blocks, 8 heads; drop path 0.1, mask ratio 0.1 (19.1M parameters at
    112x112 / 512-d)."""
    return _make("vit_t", embedding_size, dropout, image_size, mask_ratio, drop_path,
                 activation_checkpointing, fp32_head)


@register("vit_s")
def vit_s(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
          mask_ratio: float | None = None, drop_path: float | None = None,
          activation_checkpointing: bool = False, fp32_head: bool = True) -> VisionTransformer:
    """ViT-S: width 512, 12 blocks, 8 heads; drop path 0.1, mask ratio 0.1."""
    return _make("vit_s", embedding_size, dropout, image_size, mask_ratio, drop_path,
                 activation_checkpointing, fp32_head)


@register("vit_b")
def vit_b(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
          mask_ratio: float | None = None, drop_path: float | None = None,
          activation_checkpointing: bool = False, fp32_head: bool = True) -> VisionTransformer:
    """ViT-B (arcface_torch's): width 512, 24 blocks, 8 heads; drop path 0.1, mask ratio 0.1."""
    return _make("vit_b", embedding_size, dropout, image_size, mask_ratio, drop_path,
                 activation_checkpointing, fp32_head)


@register("vit_l")
def vit_l(embedding_size: int = 512, dropout: float = 0.0, image_size: ImageSize = 112,
          mask_ratio: float | None = None, drop_path: float | None = None,
          activation_checkpointing: bool = False, fp32_head: bool = True) -> VisionTransformer:
    """ViT-L (arcface_torch's vit_l_dp005_mask_005): width 768, 24 blocks, 8 heads; drop path
    0.05, mask ratio 0.05."""
    return _make("vit_l", embedding_size, dropout, image_size, mask_ratio, drop_path,
                 activation_checkpointing, fp32_head)
