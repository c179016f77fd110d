"""DALI loader: `fn.readers.mxnet` over an image-only index, decode on GPU (`mixed`) or CPU.

Why an index per epoch and rank instead of DALI's own `shard_id/num_shards`: DALI's reader serves
every record its index lists (InsightFace header and identity records would reach the decoder and
fail), splits the file into contiguous shards whose sizes differ by one (ranks would then yield
different batch counts and a downstream all-gather would hang), and always starts from the same
shard. So each epoch, each rank writes its own index listing exactly `len(loader) * batch_size`
images of the shared seeded plan (see base.py); DALI shuffles them with its seeded buffer.
DALI sorts index entries by offset and takes a record's size as the distance to the next listed
offset, so unlisted records are just skipped bytes inside a memory-mapped read.
Offsets are global over the listed .rec files (DALI's convention for several files).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from facetrain.data.base import TrainLoader
from facetrain.data.cache import cache_path_for
from facetrain.data.dataset import RecordDataset
from facetrain.data.errors import DatasetError

log = logging.getLogger(__name__)
SHUFFLE_FILL = 8192   # DALI shuffle-buffer size (samples are views of a memory map: cheap)


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as exc:
        raise ImportError("data.loader=dali needs NVIDIA DALI: pip install 'facetrain[dali]' "
                          "(or use data.loader=torch)") from exc
    return Pipeline, fn, types


def write_index_subset(dataset: RecordDataset, positions: np.ndarray, idx_path: Path
                       ) -> List[str]:
    """Write a DALI index listing only `positions`; return the .rec files to pass with it.

    Only shards holding a listed image are passed (DALI advances one file per boundary), and
    offsets are global over exactly those files. Keys are dataset positions.
    """
    positions = np.asarray(positions, np.int64)
    sids = dataset.shard_ids[positions]
    used = np.unique(sids)
    sizes = np.array([dataset.shards[s].rec.stat().st_size for s in used], np.int64)
    base = np.zeros(len(dataset.shards), np.int64)
    base[used] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    glob_off = dataset.offsets[positions] + base[sids]
    order = np.argsort(glob_off, kind="stable")
    tmp = idx_path.with_name(f".{idx_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.writelines(f"{p}\t{o}\n" for p, o in zip(positions[order].tolist(),
                                                   glob_off[order].tolist()))
    os.replace(tmp, idx_path)
    return [str(dataset.shards[s].rec) for s in used]


def write_image_only_index(dataset: RecordDataset, path: Optional[Path] = None) -> Path:
    """Index of every image record (no header/identity records), usable with plain DALI.

    Cached beside the data as `<stem>.images.idx` (or in the user cache when read-only);
    regenerated when older than any .rec.
    """
    path = path or cache_path_for(dataset.shards[0].rec, "images.idx")
    newest = max(s.rec.stat().st_mtime_ns for s in dataset.shards)
    if not path.is_file() or path.stat().st_mtime_ns < newest:
        write_index_subset(dataset, np.arange(len(dataset)), path)
    return path


class DaliTrainLoader(TrainLoader):
    """DALI pipeline per epoch; same contract as the torch loader (see base.TrainLoader)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.skip_bad_images:
            raise ValueError("data.skip_bad_images=true is supported by data.loader=torch only "
                             "(DALI fails the whole batch); use the torch loader to find and "
                             "skip bad images, or rebuild the data without them")
        _import_dali()
        self._tmp = tempfile.mkdtemp(prefix="facetrain-dali-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        write_image_only_index(self.dataset)
        self._cuda = self.ctx.device.type == "cuda"

    def _pipeline(self, recs: List[str], idx: str, n: int, decode: bool):
        Pipeline, fn, types = _import_dali()
        seed = int(np.random.default_rng([self.seed, self.epoch, self.ctx.rank]).integers(2**31))
        dev_id = (self.ctx.device.index or 0) if self._cuda else None
        pipe = Pipeline(batch_size=self.cfg.batch_size, num_threads=max(1, self.cfg.num_workers),
                        device_id=dev_id, seed=seed, prefetch_queue_depth=2)
        with pipe:
            jpegs, labels = fn.readers.mxnet(
                path=recs, index_path=[idx], random_shuffle=True, seed=seed,
                initial_fill=max(1, min(SHUFFLE_FILL, n)), name="reader")
            if not decode:
                pipe.set_outputs(labels, fn.get_property(jpegs, key="source_info"))
                return pipe
            images = fn.decoders.image(jpegs, device="mixed" if self._cuda else "cpu",
                                       output_type=types.RGB)
            h, w = self.cfg.hw
            if tuple(self.dataset.image_shape) != (h, w):
                images = fn.resize(images, resize_x=w, resize_y=h)
            mirror = fn.random.coin_flip(probability=0.5) if self.cfg.random_flip else 0
            # (x - 127.5) / 127.5: uint8 [0, 255] -> float [-1, 1], HWC -> CHW in one kernel.
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
            pipe.set_outputs(images, labels)
        return pipe

    def _dry_run(self, recs: List[str], idx: str, n: int, batches: int,
                 lookup: dict) -> List[List[int]]:
        """Positions a fresh pipeline serves in its first `batches` batches, batch by batch.

        Runs the same seeded reader without decoding and reads each sample's source info.
        """
        pipe = self._pipeline(recs, idx, n, decode=False)
        pipe.build()
        out: List[List[int]] = []
        for _ in range(batches):
            _, info = pipe.run()
            out.append([])
            for j in range(len(info)):
                text = bytes(np.array(info[j])).decode()
                path, _, off = text.rpartition(" at index ")
                out[-1].append(lookup[(path, int(off))])
        del pipe
        return out

    def _lookup(self, positions: np.ndarray) -> dict:
        ds = self.dataset
        return {(str(ds.shards[ds.shard_ids[p]].rec), int(ds.offsets[p])): int(p)
                for p in positions.tolist()}

    def _iter_batches(self, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        positions, _ = self.rank_plan()
        if start_batch >= len(self):
            return
        idx = os.path.join(self._tmp, f"epoch{self.epoch}_rank{self.ctx.rank}.idx")
        recs = write_index_subset(self.dataset, positions, Path(idx))
        if start_batch:
            seen = {p for b in self._dry_run(recs, idx, positions.size, start_batch,
                                             self._lookup(positions)) for p in b}
            positions = np.array([p for p in positions.tolist() if p not in seen], np.int64)
            recs = write_index_subset(self.dataset, positions, Path(idx))
        pipe = self._pipeline(recs, idx, positions.size, decode=True)
        pipe.build()
        try:
            for b in range(len(self) - start_batch):
                try:
                    images, labels = pipe.run()
                except RuntimeError as exc:
                    raise self._explain(exc, recs, idx, positions, b) from None
                yield self._to_torch(images, labels)
        finally:
            del pipe

    def _explain(self, exc: Exception, recs, idx, positions, batch: int) -> DatasetError:
        """Name the record DALI could not decode: replay the reader, decode with OpenCV."""
        import cv2

        ahead = 3   # the failing batch may be one the pipeline prefetched
        cands = self._dry_run(recs, idx, positions.size, batch + ahead,
                              self._lookup(positions))[batch:]
        for p in (p for b in cands for p in b):
            _, img = self.dataset.read(p)
            if cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR) is None:
                return DatasetError(f"{self.dataset.where(p)}: image bytes ({len(img)}) cannot be "
                                    "decoded (DALI stopped the pipeline); remove the record, or "
                                    "use data.loader=torch with data.skip_bad_images=true")
        first = str(exc).strip().splitlines()
        return DatasetError(f"DALI failed on a batch of {self.dataset.shards[0].rec} (records "
                            "OpenCV decodes fine: "
                            f"{', '.join(self.dataset.where(p) for p in cands[0][:4])} ...): "
                            f"{' '.join(first[-3:])}")

    def _to_torch(self, images, labels) -> Tuple[torch.Tensor, torch.Tensor]:
        lab = np.array(labels.as_tensor()).reshape(-1)
        lab_i = lab.astype(np.int64)
        if (lab_i != lab).any() or (lab_i < 0).any() or (lab_i >= self.num_classes).any():
            bad = lab[(lab_i != lab) | (lab_i < 0) | (lab_i >= self.num_classes)][0]
            raise DatasetError(f"{self.dataset.shards[0].rec}: DALI read label {bad:g}, outside "
                               f"[0, {self.num_classes}); the dataset is corrupt")
        dev = self.ctx.device
        if self._cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = images.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float32, device=dev)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(dev))
        else:
            x = torch.from_numpy(np.array(images.as_tensor()))
        return x, torch.from_numpy(lab_i).to(dev, non_blocking=True)

    def close(self) -> None:
        super().close()
        self._cleanup()
