"""What the torch and DALI loaders share: the seeded per-epoch plan and the loader contract.

Epoch plan: a permutation of all images seeded by (seed, epoch); rank r takes every world-th
entry starting at r (rank-strided) and keeps the first `len(loader) * batch_size`, so every rank
yields exactly the same number of full batches (an all-gather downstream needs equal sizes;
a rank with one batch more would hang the job at the end of the epoch). The up to
`world * batch_size - 1` images left out differ from epoch to epoch. With repeat-factor sampling
(data.repeat_factor_threshold > 0) the permutation is replaced by resampling.py's global plan,
taken by the same rank-strided rule.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import torch

from facetrain.config import ConfigError, DataConfig
from facetrain.data.dataset import RecordDataset
from facetrain.data.resampling import image_repeat_factors, plan_size, repeat_factor_rank_indices
from facetrain.dist import DistContext


def batches_per_epoch(n_images: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch (identical on all ranks)."""
    return (n_images // world_size) // batch_size


def epoch_indices(n_images: int, rank: int, world_size: int, batch_size: int, seed: int,
                  epoch: int) -> np.ndarray:
    """Dataset positions this rank reads in `epoch`, in order: int64 [len * batch_size]."""
    nb = batches_per_epoch(n_images, world_size, batch_size)
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_images)
    return perm[rank::world_size][:nb * batch_size]


def epoch_flips(count: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """Per-sample horizontal-flip decisions (bool [count]), seeded by (seed, epoch, rank)."""
    return np.random.default_rng([seed, epoch, rank, 0xF1]).random(count) < 0.5


class TrainLoader:
    """The loader contract (torch and DALI implement `_iter_batches`).

    Yields (images float32 [B, 3, S, S] in [-1, 1], RGB, on ctx.device; labels int64 [B] on
    ctx.device). Each rank's batches are its own shard of the data (not replicated).
    """

    def __init__(self, dataset: RecordDataset, cfg: DataConfig, ctx: DistContext, seed: int):
        self.dataset = dataset
        self.cfg = cfg
        self.ctx = ctx
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = dataset.num_classes
        self.class_counts = dataset.class_counts
        self.skipped = 0   # undecodable images replaced (only with cfg.skip_bad_images)
        # Repeat-factor sampling (data.repeat_factor_threshold > 0; resampling.py): per image.
        self.repeats = image_repeat_factors(dataset.labels, dataset.class_counts,
                                            cfg.repeat_factor_threshold) \
            if cfg.repeat_factor_threshold > 0 else None
        n = self.plan_images = len(dataset) if self.repeats is None else plan_size(self.repeats)
        if batches_per_epoch(n, ctx.world_size, cfg.batch_size) == 0:
            raise ConfigError(f"data.batch_size={cfg.batch_size} x {ctx.world_size} ranks needs at "
                             f"least {cfg.batch_size * ctx.world_size} images; the dataset at "
                             f"{cfg.rec} has {n}: lower data.batch_size")

    def __len__(self) -> int:
        return batches_per_epoch(self.plan_images, self.ctx.world_size, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seeded permutation the next iteration follows."""
        self.epoch = int(epoch)

    def rank_plan(self) -> Tuple[np.ndarray, np.ndarray]:
        """(positions int64 [len*B], flips bool [len*B]) of this rank for the current epoch."""
        if self.repeats is None:
            idx = epoch_indices(len(self.dataset), self.ctx.rank, self.ctx.world_size,
                                self.cfg.batch_size, self.seed, self.epoch)
        else:
            idx = repeat_factor_rank_indices(self.repeats, self.ctx.rank, self.ctx.world_size,
                                             self.cfg.batch_size, self.seed, self.epoch)
        flips = epoch_flips(idx.size, self.ctx.rank, self.seed, self.epoch)
        if not self.cfg.random_flip:
            flips[:] = False
        return idx, flips

    def iter_from(self, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from batch `start_batch` (resume after a checkpoint)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}]; got {start_batch}")
        return self._iter_batches(int(start_batch))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def _iter_batches(self, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def release_workers(self) -> None:
        """Stop worker processes kept between epochs (torch loader); a later iteration starts
        them again."""

    def close(self) -> None:
        self.dataset.close()
