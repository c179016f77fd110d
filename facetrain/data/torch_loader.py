"""PyTorch loader: OpenCV decode in DataLoader workers over our RecordIO reader.

For machines without DALI. Workers return uint8 batches (4x less to copy than float); the
normalisation to [-1, 1] runs on ctx.device in the main process.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import select
import threading
import time
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch

from facetrain.data.base import TrainLoader
from facetrain.data.dataset import RecordDataset
from facetrain.data.errors import DatasetError
from facetrain.data.images import decode_bgr

log = logging.getLogger(__name__)
_MAX_SUBSTITUTES = 64


def decode_train_image(img: bytes, size: Tuple[int, int], flip: bool) -> "np.ndarray | None":
    """Encoded bytes -> uint8 RGB [3, H, W] for size (H, W), mirrored when `flip` (None when
    OpenCV cannot decode them)."""
    import cv2

    arr, _ = decode_bgr(img)
    if arr is None:
        return None
    if arr.shape[:2] != tuple(size):
        arr = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    arr = arr[:, ::-1, ::-1] if flip else arr[:, :, ::-1]   # BGR -> RGB (+ horizontal flip)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class DecodedTrainBatches(torch.utils.data.Dataset):
    """Batched access for DataLoader: items are (position, flip) pairs; returns a whole batch.

    Output of `__getitems__`: (uint8 [B, 3, H, W], int64 labels [B], int skipped count), (H, W)
    = data.hw (data.image_size is the height).
    """

    def __init__(self, dataset: RecordDataset, size: Tuple[int, int], skip_bad: bool):
        self.dataset = dataset
        self.size = size
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, pos: int, flip: bool) -> Tuple[np.ndarray, int, int]:
        n = len(self.dataset)
        for attempt in range(_MAX_SUBSTITUTES):
            p = (pos + attempt) % n
            label, img = self.dataset.read(p)
            arr = decode_train_image(img, self.size, flip)
            if arr is not None:
                return arr, label, attempt
            if not self.skip_bad:
                raise DatasetError(f"{self.dataset.where(p)}: image bytes ({len(img)}) cannot be "
                                   "decoded by OpenCV; remove the record or set "
                                   "data.skip_bad_images=true to skip such images")
            log.warning("skipping undecodable image %s (replaced by the next image)",
                        self.dataset.where(p))
        raise DatasetError(f"{self.dataset.where(pos)}: {_MAX_SUBSTITUTES} consecutive images "
                           "cannot be decoded; the data is not images OpenCV can read")

    def __getitem__(self, item: Tuple[int, bool]):
        return self.__getitems__([item])

    def __getitems__(self, items: Sequence[Tuple[int, bool]]):
        out = np.empty((len(items), 3, *self.size), np.uint8)
        labels = np.empty(len(items), np.int64)
        skipped = 0
        for j, (pos, flip) in enumerate(items):
            out[j], labels[j], s = self._load(int(pos), bool(flip))
            skipped += s
        return torch.from_numpy(out), torch.from_numpy(labels), skipped


def _identity_collate(batch):
    return batch


def _worker_init(trainer_pid: int, _: int) -> None:
    import cv2

    cv2.setNumThreads(1)   # one decode thread per worker: the workers are the parallelism
    exit_with_process(trainer_pid)


def exit_with_process(pid: int) -> None:
    """End this process as soon as process `pid` (the trainer) ends, however it ends.

    A worker started from a forkserver is the forkserver's child, so torch's worker watchdog
    (which watches the parent) never fires when the trainer is killed; and the forkserver waits
    for all its clients, the workers included, before it exits. A killed trainer therefore left
    both behind for good (orphans under PID 1, ~340 MB each). A daemon thread blocks on a pidfd
    of the trainer (Linux >= 5.3; else it polls once a second) and leaves with os._exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        os._exit(0)

    threading.Thread(target=watch, name="facetrain-trainer-watch", daemon=True).start()


class _BatchPlan:
    """Batches [(position, flip)] of one rank's epoch from `start`, made lazily (no big lists)."""

    def __init__(self, idx: np.ndarray, flips: np.ndarray, batch_size: int, start: int):
        self.idx, self.flips, self.b, self.start = idx, flips, batch_size, start

    def __len__(self) -> int:
        return self.idx.size // self.b - self.start

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        for i in range(self.start, self.idx.size // self.b):
            sl = slice(i * self.b, (i + 1) * self.b)
            yield list(zip(self.idx[sl].tolist(), self.flips[sl].tolist()))


class _CurrentPlan:
    """The DataLoader's batch sampler: iterates the plan set for the coming iteration, so that
    one DataLoader (and its persistent workers) serves every epoch. The order of each epoch is
    still made here in the trainer process from (seed, epoch, rank), exactly as before."""

    def __init__(self) -> None:
        self.plan: "_BatchPlan | None" = None

    def __len__(self) -> int:
        return len(self.plan) if self.plan is not None else 0

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        return iter(self.plan if self.plan is not None else ())


class TorchTrainLoader(TrainLoader):
    """torch.utils.data.DataLoader over `DecodedTrainBatches` with a seeded per-rank batch plan.

    Its workers persist across epochs (a new epoch does not start new processes, each of which
    imports torch and OpenCV before its first batch); only one iteration of a loader is live at
    a time: starting another ends the previous one. `release_workers` stops them."""

    _loader: "torch.utils.data.DataLoader | None" = None

    def _batch_plan(self, start_batch: int) -> _BatchPlan:
        idx, flips = self.rank_plan()
        return _BatchPlan(idx, flips, self.cfg.batch_size, start_batch)

    def _data_loader(self) -> "torch.utils.data.DataLoader":
        if self._loader is not None:
            return self._loader
        images = DecodedTrainBatches(self.dataset, self.cfg.hw, self.cfg.skip_bad_images)
        workers = self.cfg.num_workers
        # Workers start from a forkserver, not a fork of this process: a fork copies OpenCV's
        # and OpenMP's thread pools mid-lock once this process has used them (in-training
        # verification, evaluation in the same process) and the workers then hang in decode.
        context = multiprocessing.get_context("forkserver") if workers else None
        self._plan = _CurrentPlan()
        self._loader = torch.utils.data.DataLoader(
            images, batch_sampler=self._plan, num_workers=workers, collate_fn=_identity_collate,
            pin_memory=self.ctx.device.type == "cuda",
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
            multiprocessing_context=context)
        return self._loader

    def _iter_batches(self, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self._batch_plan(start_batch)
        loader = self._data_loader()
        self._plan.plan = plan
        dev = self.ctx.device
        for imgs, labels, skipped in loader:
            if skipped:
                self.skipped += skipped
                log.warning("%d undecodable images replaced so far", self.skipped)
            # Normalise on the target device: (x - 127.5) / 127.5 maps [0, 255] to [-1, 1].
            x = imgs.to(dev, non_blocking=True).float().div_(127.5).sub_(1.0)
            yield x, labels.to(dev, non_blocking=True)

    def release_workers(self) -> None:
        """Stop the persistent workers now (the next iteration starts new ones)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        self.release_workers()
        super().close()
