"""Two gloo processes: both loaders give every rank the same number of batches, the rank shards
are disjoint and cover len(loader) * batch * world distinct images of the epoch's plan."""
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist

from _helpers import run_spawn
from facetrain.build.writer import write_insightface_dataset
from facetrain.config import DataConfig
from facetrain.data import build_train_loader
from facetrain.data.base import epoch_indices

N_IMAGES = 27            # uneven: 13.5 per rank -> 13 -> 4 batches of 3


def _check(ctx, rec: str, out_dir: str) -> None:
    results = {}
    for kind in ("torch", "dali"):
        cfg = DataConfig(rec=rec, loader=kind, batch_size=3, num_workers=1, image_size=8,
                         random_flip=False)
        loader = build_train_loader(cfg, ctx, seed=5)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            ids = []
            for x, y in loader:
                # Every image is unique: its class id is also encoded in the red channel.
                red = torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()
                assert torch.equal(red, y * 9), (red, y)
                ids.append(y)
            mine = torch.cat(ids)
            counts = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world_size)]
            # Batch counts must agree on every rank, or a later all-gather would hang.
            dist.all_gather(counts, torch.tensor([len(ids)]), group=ctx.group)
            gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
            dist.all_gather(gathered, mine, group=ctx.group)
            results[(kind, epoch)] = ([int(c) for c in counts], torch.cat(gathered).tolist())
        loader.close()
    if ctx.rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")


def test_two_rank_sharding(tmp_path):
    items = []
    for c in range(N_IMAGES):      # one image per class: the label identifies the image
        img = np.full((8, 8, 3), 9 * c, np.uint8)
        items.append((c, cv2.imencode(".png", img)[1].tobytes()))
    write_insightface_dataset(tmp_path / "train", items, N_IMAGES, 8)
    run_spawn(_check, 2, str(tmp_path / "train"), str(tmp_path))
    results = torch.load(tmp_path / "results.pt")
    for (kind, epoch), (counts, labels) in results.items():
        assert counts == [4, 4], (kind, counts)
        assert len(labels) == 24 and len(set(labels)) == 24, (kind, epoch)   # disjoint
        plan = set(epoch_indices(N_IMAGES, 0, 2, 3, 5, epoch).tolist()) | \
            set(epoch_indices(N_IMAGES, 1, 2, 3, 5, epoch).tolist())
        assert set(labels) == plan                  # position == label in this dataset
    assert set(results[("torch", 0)][1]) != set(results[("torch", 1)][1]) or \
        results[("torch", 0)][1] != results[("torch", 1)][1]
