"""facetrain.data: reading training data: the RecordIO codec, dataset files and their index
checks, image decoding, the training loaders (torch and DALI) and their epoch plans.

Public entry point for the trainer: `build_train_loader(cfg.data, ctx, seed)`. Writing datasets
(from folders, subsets, merges, packs, alignment) is `facetrain.build`'s.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from facetrain.config import DataConfig
    from facetrain.data.base import TrainLoader
    from facetrain.dist import DistContext


def build_train_loader(cfg: "DataConfig", ctx: "DistContext", seed: int) -> "TrainLoader":
    """The training loader `cfg.loader` names (torch or dali) over the dataset at `cfg.rec`.

    Every rank yields len(loader) full batches of cfg.batch_size images (its own shard).
    """
    from facetrain.config import ConfigError
    from facetrain.data.dataset import RecordDataset

    if not cfg.rec:
        raise ConfigError("data.rec is not set: give the training data's RecordIO prefix, .rec "
                          "file or folder of shards (data.rec=/path/to/train)")
    dataset = RecordDataset.open(cfg.rec, rebuild_index=cfg.rebuild_index)
    if cfg.loader == "dali":
        from facetrain.data.dali_loader import DaliTrainLoader

        return DaliTrainLoader(dataset, cfg, ctx, seed)
    from facetrain.data.torch_loader import TorchTrainLoader

    return TorchTrainLoader(dataset, cfg, ctx, seed)


def __getattr__(name: str):
    # Lazy re-exports keep `import facetrain.data` free of torch/cv2/DALI imports.
    if name == "TrainLoader":
        from facetrain.data.base import TrainLoader

        return TrainLoader
    if name == "RecordDataset":
        from facetrain.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'facetrain.data' has no attribute {name!r}")
