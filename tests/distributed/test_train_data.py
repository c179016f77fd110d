"""A tiny learnable long-tailed RecordIO and a tiny trainer config, shared by the trainer tests
(tests/distributed/test_train*.py, tests/e2e/test_launch*.py, test_fault*.py, test_deepspeed*.py).
No tests here."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import cv2
import numpy as np

from facetrain.config import Config, load_config

COUNTS = (24, 24, 16, 16, 8, 8, 4, 4, 4, 4, 4, 4)    # 12 classes, 120 images, long-tailed
SIZE = 16


def make_tiny_rec(folder: Path, counts: Sequence[int] = COUNTS, seed: int = 0) -> str:
    """Write `folder/train.rec/.idx/property` (InsightFace layout) with the project's writer:
    each class is a fixed random 4x4 colour pattern, upscaled, plus per-image noise. Returns the
    prefix to put in data.rec."""
    from facetrain.build.writer import write_insightface_dataset

    rng = np.random.RandomState(seed)
    items = []
    for label, n in enumerate(counts):
        proto = cv2.resize(rng.randint(0, 256, (4, 4, 3)).astype(np.uint8), (SIZE, SIZE),
                           interpolation=cv2.INTER_NEAREST).astype(np.float32)
        for _ in range(n):
            img = np.clip(proto + rng.normal(0, 25, proto.shape), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            items.append((label, buf.tobytes()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_insightface_dataset(folder / "train", items, num_classes=len(counts), image_size=SIZE)
    return str(folder / "train")


def tiny_overrides(rec: str, out: Path, extra: Sequence[str] = ()) -> List[str]:
    """Dotted overrides for a seconds-long CPU run of the tiny backbone on `rec`."""
    return [f"data.rec={rec}", "data.batch_size=4", "data.num_workers=0",
            f"data.image_size={SIZE}", "data.random_flip=true", "model.backbone=tiny",
            "model.embedding_size=32", "head.margin.scale=16", "head.margin.m_cos=0.1",
            "leap.mode=full", "leap.start_epoch=1", "leap.update_interval=1",
            "leap.head_threshold=8", "optim.lr=0.02", "schedule.name=cyclic",
            "schedule.cycle_epochs=1", "schedule.min_lr=0.01", "train.epochs=3",
            "train.device=cpu", f"train.output_dir={out}", "train.log_every=1",
            "train.tensorboard=false", "checkpoint.every_steps=5", "checkpoint.keep_last=2",
            *extra]


def tiny_config(rec: str, out: Path, extra: Sequence[str] = ()) -> Config:
    return load_config(None, tiny_overrides(rec, out, extra))
