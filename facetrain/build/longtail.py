"""Long-tailed subsets (the LEAP paper's <H head, T tail, S samples> protocols), streamed.

Classes are ranked by image count (ties: lower class id first). The top `head` classes keep all
their images; the next `tail` classes with at least `tail_samples` images (all of them when tail
is None) keep `tail_samples` images chosen at random (seeded). New labels are contiguous, head
first, in rank order. Records are copied as bytes (only the 24-byte IRHeader label changes; the
image is never decoded). Memory holds per-class arrays and the selected records' positions, never
per-image arrays of the input: the .idx is read in chunks, and a label scan (im2rec inputs) goes
to a memory-mapped cache file.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from facetrain.build.output import check_output_folder, removed_if_failed, write_text_tmp
from facetrain.build.writer import relabel_framed, write_insightface_dataset
from facetrain.data import recordio as rio
from facetrain.data.cache import cache_path_for, commit_memmap, load_cached_mmap, \
    memmap_for_writing
from facetrain.data.dataset import (PROPERTY, ShardFiles, label_cache_stamp,
                                    labels_from_ranges, read_label_at, read_property,
                                    resolve_shards)
from facetrain.data.errors import DatasetError
from facetrain.data.framing import check_framing_streaming

log = logging.getLogger(__name__)
DEFAULT_TAIL_SAMPLES = 5     # the paper's S
OUTPUT_EXTRAS = ("property", "manifest.csv")   # written beside the train*.rec/.idx files


def rank_classes(counts: np.ndarray) -> np.ndarray:
    """Class ids by image count, largest first; ties by class id."""
    return np.lexsort((np.arange(counts.size), -counts))


def read_tail_exclude(path: str, counts: np.ndarray) -> Dict[int, np.ndarray]:
    """A CSV with a header naming `label` and `ordinal` (other columns are ignored): images
    (ordinal = position within the class, in dataset order) a tail class may not keep.
    -> {source label: sorted ordinals}. Why: to control what the tail lacks, e.g. the glyph
    set's brush designs (build_glyphs writes train_designs.csv with those columns)."""
    out: Dict[int, List[int]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"label", "ordinal"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header must name the columns label and ordinal; "
                             f"missing {sorted(missing)} (header: {reader.fieldnames})")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            try:
                label, ordinal = int(row["label"]), int(row["ordinal"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: label and ordinal must be integers; got "
                                 f"{row['label']!r}, {row['ordinal']!r}") from None
            if not 0 <= label < counts.size or not 0 <= ordinal < counts[label]:
                size = int(counts[label]) if 0 <= label < counts.size else 0
                raise ValueError(f"{where}: label {label} ordinal {ordinal} is not an image of "
                                 f"the dataset ({counts.size} classes; that class has {size})")
            out.setdefault(label, []).append(ordinal)
    return {k: np.unique(np.asarray(v, np.int64)) for k, v in out.items()}


def select_classes(counts: np.ndarray, head: int, tail: Optional[int], tail_samples: int,
                   allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(head class ids, tail class ids), each in new-label order (source ids). `allowed`: per
    class, how many images a tail class may pick from (default: all of them)."""
    if head < 0 or head > counts.size:
        raise ValueError(f"`head` must be in [0, {counts.size}] (the dataset's class count); "
                         f"got {head}")
    if tail_samples < 1:
        raise ValueError(f"`tail_samples` must be >= 1; got {tail_samples}")
    order = rank_classes(counts)
    rest = order[head:]
    eligible = rest[(counts if allowed is None else allowed)[rest] >= tail_samples]
    tail_ids = eligible if tail is None else eligible[:tail]
    if tail is not None and tail_ids.size < tail:
        log.warning("only %d classes after the head have >= %d images; asked for tail=%d",
                    tail_ids.size, tail_samples, tail)
    return order[:head], tail_ids


def pick_tail_images(counts: np.ndarray, tail_ids: np.ndarray, tail_samples: int,
                     seed: int, excluded: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
    """Sorted codes class * stride + ordinal of the chosen images (ordinal within the class).
    A class with `excluded` ordinals picks among its other images."""
    rng = np.random.default_rng(seed)
    stride = int(counts.max()) + 1
    excluded = excluded or {}
    codes = []
    for c in tail_ids.tolist():
        if c in excluded:
            pool = np.setdiff1d(np.arange(int(counts[c])), excluded[c])
            pick = pool[rng.choice(pool.size, tail_samples, replace=False)]
        else:
            pick = rng.choice(int(counts[c]), tail_samples, replace=False)
        codes.append(c * stride + np.sort(pick))
    return np.sort(np.concatenate(codes)) if codes else np.empty(0, np.int64)


class StreamingSource:
    """A dataset read in bounded chunks: class counts plus (shard, keys, offsets, labels) chunks.

    Same layout rules and dataset order as `RecordDataset`.
    """

    def __init__(self, path: str):
        self.shards: List[ShardFiles] = resolve_shards(path)
        for shard in self.shards:   # every indexed offset, before anything relies on them
            check_framing_streaming(shard.rec, shard.idx)
        self.lo = self.hi = None
        self._labels_mmap = None
        self._find_header()
        if self.lo is not None and self.hi > self.lo:
            self._read_identity_records()
        else:
            self._scan_labels()
        prop = read_property(self.shards[0].rec.parent)
        self.image_shape = prop[1] if prop else None
        if prop and prop[0] != self.counts.size:
            raise DatasetError(f"{self.shards[0].rec.parent / PROPERTY} says {prop[0]} classes "
                               f"but the data has {self.counts.size}; fix the property file")

    def _chunks_raw(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        for sid, shard in enumerate(self.shards):
            if not shard.rec.is_file():
                raise FileNotFoundError(f"record file {shard.rec} does not exist")
            for keys, offs in rio.iter_index_chunks(shard.idx):
                yield sid, keys, offs

    def _find_header(self) -> None:
        fd = os.open(self.shards[0].rec, os.O_RDONLY)
        try:
            for keys, offs in rio.iter_index_chunks(self.shards[0].idx):
                hit = np.nonzero(keys == 0)[0]
                if hit.size:
                    payload, _ = rio.read_record_at(fd, int(offs[hit[0]]), self.shards[0].rec, 0)
                    h, img = rio.unpack_record(payload, f"{self.shards[0].rec}: record key 0")
                    if h.flag == 2 and not img:
                        self.lo, self.hi = int(h.label[0]), int(h.label[1])
                    return
        finally:
            os.close(fd)

    def _read_identity_records(self) -> None:
        n = self.hi - self.lo
        starts = np.full(n, -1, np.int64)
        ends = np.full(n, -1, np.int64)
        fds: Dict[int, int] = {}
        try:
            for sid, keys, offs in self._chunks_raw():
                sel = np.nonzero((keys >= self.lo) & (keys < self.hi))[0]
                if sel.size and sid not in fds:
                    fds[sid] = os.open(self.shards[sid].rec, os.O_RDONLY)
                for j in sel.tolist():
                    k = int(keys[j])
                    payload, _ = rio.read_record_at(fds.get(sid), int(offs[j]),
                                                    self.shards[sid].rec, k)
                    h, _ = rio.unpack_record(payload, f"{self.shards[sid].rec}: identity key {k}")
                    starts[k - self.lo], ends[k - self.lo] = int(h.label[0]), int(h.label[1])
        finally:
            for fd in fds.values():
                os.close(fd)
        if (starts < 0).any():
            c = int(np.nonzero(starts < 0)[0][0])
            raise DatasetError(f"{self.shards[0].rec}: identity record key {self.lo + c} is "
                               "missing from the index; the dataset is incomplete")
        self.starts, self.ends, self.counts = starts, ends, ends - starts

    def _is_image(self, keys: np.ndarray) -> np.ndarray:
        if self.lo is None:
            return np.ones(keys.size, bool)
        return (keys >= 1) & (keys < self.lo)

    def _scan_labels(self) -> None:
        """One header scan of every image, written to a memory-mapped cache (RecordDataset's)."""
        cache = cache_path_for(self.shards[0].rec, "labels.npy")
        stamp = label_cache_stamp(self.shards)
        labels = load_cached_mmap(cache, stamp)
        if labels is None:
            n = sum(int(self._is_image(k).sum()) for _, k, _ in self._chunks_raw())
            out, tmp = memmap_for_writing(cache, n)
            fds = [os.open(s.rec, os.O_RDONLY) for s in self.shards]
            try:
                i = 0
                for sid, keys, offs in self._chunks_raw():
                    m = self._is_image(keys)
                    for k, o in zip(keys[m].tolist(), offs[m].tolist()):
                        out[i] = read_label_at(fds[sid], o, self.shards[sid].rec, k)
                        i += 1
                commit_memmap(out, tmp, cache, stamp)
            finally:   # no half-written cache left beside the input, whatever stopped the scan
                for fd in fds:
                    os.close(fd)
                tmp.unlink(missing_ok=True)
            labels = load_cached_mmap(cache, stamp)
        self._labels_mmap = labels
        counts = np.zeros(int(labels.max()) + 1 if labels.size else 0, np.int64)
        for a in range(0, labels.size, 1 << 22):
            counts += np.bincount(labels[a:a + (1 << 22)], minlength=counts.size)
        self.counts = counts

    def chunks(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(shard id, keys, offsets, labels) of the images, in dataset order."""
        i = 0
        for sid, keys, offs in self._chunks_raw():
            m = self._is_image(keys)
            keys, offs = keys[m], offs[m]
            if self._labels_mmap is not None:
                labels = np.asarray(self._labels_mmap[i:i + keys.size], np.int64)
            else:
                labels = labels_from_ranges(self.starts, self.ends, keys)
                if (labels < 0).any():
                    raise DatasetError(f"{self.shards[sid].rec}: image key "
                                       f"{int(keys[labels < 0][0])} is in no identity range")
            i += keys.size
            yield sid, keys, offs, labels


def _select(src: StreamingSource, new_label: np.ndarray, is_head: np.ndarray, picks: np.ndarray
            ) -> Tuple[np.ndarray, ...]:
    """One streaming pass: (new label, shard, offset, key) of every kept image, dataset order."""
    counts = src.counts
    stride = int(counts.max()) + 1
    seen = np.zeros(counts.size, np.int64)
    sel: List[Tuple[np.ndarray, ...]] = []
    for sid, keys, offs, labels in src.chunks():
        ords = _ordinals(labels, seen)
        seen += np.bincount(labels, minlength=counts.size)
        keep = is_head[labels] | np.isin(labels * stride + ords, picks)
        sel.append((new_label[labels[keep]], np.full(int(keep.sum()), sid, np.int32),
                    offs[keep], keys[keep]))
    return tuple(np.concatenate(x) for x in zip(*sel))


def _ordinals(labels: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Position of each image within its class, counting images of earlier chunks (`seen`)."""
    order = np.argsort(labels, kind="stable")
    sl = labels[order]
    first = np.r_[0, np.nonzero(np.diff(sl))[0] + 1]
    group_start = np.repeat(first, np.diff(np.r_[first, sl.size]))
    ords = np.empty(labels.size, np.int64)
    ords[order] = np.arange(sl.size) - group_start + seen[sl]
    return ords


@dataclass
class LongtailSummary:
    head_classes: int
    tail_classes: int
    head_images: int
    tail_images: int
    seconds: float
    output: str

    @property
    def records_per_s(self) -> float:
        return (self.head_images + self.tail_images) / max(self.seconds, 1e-9)


def make_longtail(input_path: str, output_dir: str, head: int, tail: Optional[int],
                  tail_samples: int = DEFAULT_TAIL_SAMPLES, seed: int = 0,
                  shard_size: Optional[int] = None, progress: bool = False,
                  tail_exclude: Optional[str] = None, overwrite: bool = False) -> LongtailSummary:
    """Write `output_dir/train.rec|.idx` (or train_000.rec ...), `property`, `manifest.csv`.
    `tail_exclude`: a label,ordinal CSV of images tail classes may not keep (read_tail_exclude).
    The output folder may not be (or lie inside) the input's folder, and an existing non-empty
    one is refused unless `overwrite` (then only the dataset files are replaced; see output.py).
    """
    t0 = time.perf_counter()
    plan = check_output_folder(Path(output_dir), [s.rec for s in resolve_shards(input_path)],
                               overwrite, extras=OUTPUT_EXTRAS)     # before any slow step
    src = StreamingSource(input_path)
    if plan.replaced or plan.kept:
        log.warning("%s", plan.describe())
    counts = src.counts
    excluded = read_tail_exclude(tail_exclude, counts) if tail_exclude else {}
    allowed = counts.copy()
    for c, ords in excluded.items():
        allowed[c] -= ords.size
    head_ids, tail_ids = select_classes(counts, head, tail, tail_samples, allowed)
    new_label = np.full(counts.size, -1, np.int64)
    new_label[np.concatenate([head_ids, tail_ids])] = np.arange(head_ids.size + tail_ids.size)
    is_head = np.zeros(counts.size, bool)
    is_head[head_ids] = True
    picks = pick_tail_images(counts, tail_ids, tail_samples, seed, excluded)
    nl, sids, offs, keys = _select(src, new_label, is_head, picks)
    if nl.size == 0:
        raise ValueError(f"{input_path}: `head` {head} with `tail_samples` {tail_samples} selects "
                         "no image; raise `head` or lower `tail_samples`")
    order = np.argsort(nl, kind="stable")     # group by new label, dataset order inside
    shape = src.image_shape or probe_shape(src, int(sids[order[0]]), int(offs[order[0]]))
    out = Path(output_dir)
    bar = _progress(order.size, progress)

    def items() -> Iterator[Tuple[int, bytes]]:
        fds = {}
        try:
            for n, j in enumerate(order.tolist()):
                s = int(sids[j])
                fd = fds.get(s) or fds.setdefault(s, os.open(src.shards[s].rec, os.O_RDONLY))
                raw = rio.read_framed_at(fd, int(offs[j]), src.shards[s].rec, int(keys[j]))
                if bar is not None and n % 1024 == 0:
                    bar.update(min(1024, order.size - n))
                yield int(nl[j]), relabel_framed(raw, int(nl[j]), n + 1)
        finally:
            for fd in fds.values():
                os.close(fd)

    manifest = out / "manifest.csv"
    with removed_if_failed(out):
        tmp = write_text_tmp(manifest, _manifest_rows(head_ids, tail_ids, counts, tail_samples))
        try:
            write_insightface_dataset(out / "train", items(), head_ids.size + tail_ids.size,
                                      shape, shard_size=shard_size, framed=True)
            os.replace(tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)
            if bar is not None:
                bar.close()
    n_head = int(counts[head_ids].sum())
    return LongtailSummary(int(head_ids.size), int(tail_ids.size), n_head,
                           int(order.size) - n_head, time.perf_counter() - t0, str(out))


def probe_shape(src: StreamingSource, sid: int, off: int) -> Tuple[int, int]:
    """Image size from one decoded image, for inputs without a property file."""
    import cv2

    fd = os.open(src.shards[sid].rec, os.O_RDONLY)
    try:
        _, img = rio.unpack_record(rio.read_record_at(fd, off, src.shards[sid].rec)[0])
    finally:
        os.close(fd)
    arr = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise DatasetError(f"{src.shards[sid].rec}: record at byte {off} is not a decodable "
                           "image and there is no property file giving the image size")
    return int(arr.shape[0]), int(arr.shape[1])


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="copy", mininterval=1.0)


def _manifest_rows(head_ids, tail_ids, counts, tail_samples: int) -> List[list]:
    rows = [["new_label", "source_label", "images", "part"]]
    rows += [[i, c, int(counts[c]), "head"] for i, c in enumerate(head_ids.tolist())]
    rows += [[head_ids.size + i, c, tail_samples, "tail"] for i, c in enumerate(tail_ids.tolist())]
    return rows
