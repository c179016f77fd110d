"""Merge several RecordIO datasets into one InsightFace-layout dataset (e.g. own photos + MS1M).

Classes are relabelled without collisions: the first input keeps labels 0..C1-1, the second
follows at C1, and so on. Records are copied as bytes, like make_longtail: only the 24-byte
IRHeader label and id change, the image is never decoded. A manifest.csv maps every new label to
its input and source label. Memory holds the per-image positions of one input at a time.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from facetrain.build.longtail import StreamingSource, probe_shape
from facetrain.build.output import OutputError, check_output_folder, removed_if_failed, \
    write_text_tmp
from facetrain.build.writer import relabel_framed, write_insightface_dataset
from facetrain.data import recordio as rio
from facetrain.data.dataset import resolve_shards
from facetrain.data.errors import DatasetError

log = logging.getLogger(__name__)
OUTPUT_EXTRAS = ("property", "manifest.csv")
MANIFEST_HEADER = ["new_label", "input", "source", "source_label", "images"]


@dataclass
class MergeSummary:
    classes: int
    images: int
    per_input: List[Tuple[str, int, int]]     # (path, classes, images), in input order
    image_shape: Tuple[int, int]
    seconds: float
    output: str


def _positions(src: StreamingSource) -> Tuple[np.ndarray, ...]:
    """(labels, shard ids, offsets, keys) of every image of one input, grouped by label
    (dataset order inside a class): the writer needs each class's images contiguous."""
    parts = [(labels, np.full(keys.size, sid, np.int32), offs, keys)
             for sid, keys, offs, labels in src.chunks()]
    if not parts:
        return tuple(np.empty(0, np.int64) for _ in range(4))
    labels, sids, offs, keys = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(labels, kind="stable")
    return labels[order], sids[order], offs[order], keys[order]


def _shape_of(path: str, src: StreamingSource) -> Tuple[int, int]:
    """(h, w) from the property file, else from the first image decoded."""
    if src.image_shape:
        return tuple(src.image_shape)
    for sid, keys, offs, _ in src.chunks():
        if keys.size:
            return probe_shape(src, sid, int(offs[0]))
    raise DatasetError(f"{path}: the dataset has no image and no property file")


def merge_datasets(inputs: Sequence[str], output_dir: str, allow_mixed_sizes: bool = False,
                   shard_size: Optional[int] = None, progress: bool = False,
                   overwrite: bool = False) -> MergeSummary:
    """Write `output_dir/train.rec|.idx` (or train_000.rec ...), `property` and `manifest.csv`.

    Refused: fewer than two inputs, an input given twice, an output folder that is (or lies
    inside) an input's folder, and inputs of different image sizes unless `allow_mixed_sizes`
    (the training loader resizes; `property` then records the first input's size).
    """
    t0 = time.perf_counter()
    if len(inputs) < 2:
        raise ValueError(f"give at least two datasets to merge; got {len(inputs)}")
    shards = [resolve_shards(p) for p in inputs]
    seen = {}
    for path, sh in zip(inputs, shards):
        key = tuple(s.rec.resolve() for s in sh)
        if key in seen:
            raise ValueError(f"{path}: the same dataset as {seen[key]}; each input may be given "
                             "once (merging a dataset with itself would duplicate its images)")
        seen[key] = path
    out = Path(output_dir)
    try:
        plan = check_output_folder(out, [s.rec for sh in shards for s in sh], overwrite,
                                   extras=OUTPUT_EXTRAS)
    except OutputError as exc:
        raise OutputError(f"{exc} (the output may not be one of the merged inputs)") from None
    sources = [StreamingSource(p) for p in inputs]
    if plan.replaced or plan.kept:
        log.warning("%s", plan.describe())
    shapes = [_shape_of(p, s) for p, s in zip(inputs, sources)]
    if len(set(shapes)) > 1:
        sizes = ", ".join(f"{p}: {h}x{w}" for p, (h, w) in zip(inputs, shapes))
        if not allow_mixed_sizes:
            raise ValueError(f"the inputs have different image sizes ({sizes}); resize them to "
                             "one size (facetrain.build.folders.folders_to_rec(size=...)), or pass "
                             "`allow_mixed_sizes=True` to merge anyway (the loader then resizes "
                             "to data.image_size)")
        log.warning("merging different image sizes (%s); property records %dx%d", sizes,
                    *shapes[0])
    offsets = np.cumsum([0] + [int(s.counts.size) for s in sources])
    total = int(sum(int(s.counts.sum()) for s in sources))
    rows: List[list] = [MANIFEST_HEADER]
    for i, (path, src) in enumerate(zip(inputs, sources)):
        rows += [[int(offsets[i]) + c, i, path, c, int(n)] for c, n in enumerate(src.counts)]
    bar = _progress(total, progress)

    def items() -> Iterator[Tuple[int, bytes]]:
        key = 1
        for i, src in enumerate(sources):
            labels, sids, offs, keys = _positions(src)
            fds = {}
            try:
                for lab, s, off, k in zip(labels.tolist(), sids.tolist(), offs.tolist(),
                                          keys.tolist()):
                    fd = fds.get(s) or fds.setdefault(s, os.open(src.shards[s].rec, os.O_RDONLY))
                    raw = rio.read_framed_at(fd, off, src.shards[s].rec, k)
                    new = int(offsets[i]) + lab
                    yield new, relabel_framed(raw, new, key)
                    key += 1
                    if bar is not None:
                        bar.update(1)
            finally:
                for fd in fds.values():
                    os.close(fd)

    manifest = out / "manifest.csv"
    with removed_if_failed(out):
        tmp = write_text_tmp(manifest, rows)
        try:
            n = write_insightface_dataset(out / "train", items(), int(offsets[-1]), shapes[0],
                                          shard_size=shard_size, framed=True)
            os.replace(tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)
            if bar is not None:
                bar.close()
    per_input = [(p, int(s.counts.size), int(s.counts.sum())) for p, s in zip(inputs, sources)]
    return MergeSummary(int(offsets[-1]), n, per_input, shapes[0], time.perf_counter() - t0,
                        str(out))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="merge", mininterval=1.0)
