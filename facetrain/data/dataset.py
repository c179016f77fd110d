"""One image dataset over one .rec/.idx pair or many shards, InsightFace or im2rec layout.

InsightFace layout: key 0 is a header record (no image, label `[first_identity_key, end]`),
keys `1 .. first_identity_key-1` are images with a scalar class label, keys
`first_identity_key .. end-1` are one record per class with label `[first_image, end_image)`.
im2rec layout: every record is an image. Shards (`train_000.rec`, `train_001.rec`, ...) are read
as one dataset: our writer gives them one key space (header in the first shard, identity records
in the last), and shards made independently by im2rec (keys repeat) are simply concatenated.
Class counts K_i come from identity records; without them, from one header scan whose result is
cached beside the data (or under ~/.cache/facetrain when the data folder is read-only).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from facetrain.data import recordio as rio
from facetrain.data.cache import cache_path_for, load_cached, save_cached
from facetrain.data.errors import DatasetError
from facetrain.data.shards import (PROPERTY, ShardFiles, check_index,  # noqa: F401
                                   read_property, rebuild_indexes, resolve_shards)


def _label_of(header: rio.IRHeader) -> float:
    return float(header.label[0]) if header.flag > 0 else float(header.label)


class RecordDataset:
    """Images of a RecordIO dataset in dataset order (shard order, then .idx order).

    Per image (arrays of length len(self)): `labels` int64, `shard_ids` int32, `keys` int64,
    `offsets` int64 (byte offset in its shard). Class facts: `num_classes`, `class_counts`
    (int64 [num_classes], K_i), `image_shape` ((h, w) from `property`, or None).
    """

    def __init__(self, shards: List[ShardFiles], layout: str, labels: np.ndarray,
                 shard_ids: np.ndarray, keys: np.ndarray, offsets: np.ndarray, num_classes: int,
                 class_counts: np.ndarray, image_shape: Optional[Tuple[int, int]]):
        self.shards = shards
        self.layout = layout
        self.labels = labels
        self.shard_ids = shard_ids
        self.keys = keys
        self.offsets = offsets
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.image_shape = image_shape
        self._fds: dict = {}
        self._pid = -1

    @classmethod
    def open(cls, path: str, rebuild_index: bool = False) -> "RecordDataset":
        """Open a prefix, a .rec path or a folder of shards (see the module docstring)."""
        if rebuild_index:
            rebuild_indexes(path)
        shards = resolve_shards(path)
        indexes = [check_index(s) for s in shards]
        prop = read_property(shards[0].rec.parent)
        header = _find_insightface_header(shards, indexes)
        stated = prop[0] if prop is not None else None
        if header is not None:
            parts = _open_insightface(shards, indexes, header, stated)
        else:
            parts = _open_im2rec(shards, indexes, stated)
        layout, labels, sids, keys, offs, counts = parts
        if labels.size == 0:
            raise DatasetError(f"{shards[0].rec} holds no image records")
        num_classes = int(counts.size)
        shape = None
        if prop is not None:
            pn, shape = prop
            prop_path = shards[0].rec.parent / PROPERTY
            if layout == "insightface" and pn != num_classes:
                raise DatasetError(f"{prop_path} says {pn} classes but the identity records of "
                                   f"{shards[0].rec} list {num_classes}; fix or delete the "
                                   "property file")
            if pn < num_classes:
                bad = int(np.argmax(labels >= pn))
                raise DatasetError(
                    f"{shards[sids[bad]].rec}: record key {int(keys[bad])} has label "
                    f"{int(labels[bad])}, outside [0, {pn}) set by {prop_path}; fix the label or "
                    "the property file")
            if pn > num_classes:
                raise DatasetError(f"{prop_path} says {pn} classes but the labels in "
                                   f"{shards[0].rec} only reach {num_classes - 1}; fix the "
                                   "property file")
        return cls(shards, layout, labels, sids, keys, offs, num_classes, counts, shape)

    def __len__(self) -> int:
        return int(self.labels.size)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard].rec, os.O_RDONLY)
        return fd

    def read_raw(self, i: int) -> bytes:
        """Payload (IRHeader + image) of image i, as stored."""
        s = int(self.shard_ids[i])
        return rio.read_record_at(self._fd(s), int(self.offsets[i]), self.shards[s].rec,
                                  int(self.keys[i]))[0]

    def where(self, i: int) -> str:
        return f"{self.shards[int(self.shard_ids[i])].rec}: record key {int(self.keys[i])} " \
               f"at byte {int(self.offsets[i])}"

    def read(self, i: int) -> Tuple[int, bytes]:
        """(label, encoded image bytes) of image i; the stored label is checked against K_i."""
        header, img = rio.unpack_record(self.read_raw(i), self.where(i))
        label = _label_of(header)
        if label != self.labels[i]:
            raise DatasetError(f"{self.where(i)}: label {label:g} disagrees with the identity "
                               f"records (class {int(self.labels[i])}); the dataset is corrupt")
        return int(self.labels[i]), img

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state


def _find_insightface_header(shards, indexes) -> Optional[Tuple[int, int, int]]:
    """(shard, lo, hi) of an InsightFace header record (key 0, 2 float labels, no image)."""
    keys, offs = indexes[0]
    hit = np.nonzero(keys == 0)[0]
    if hit.size == 0:
        return None
    fd = os.open(shards[0].rec, os.O_RDONLY)
    try:
        payload, _ = rio.read_record_at(fd, int(offs[hit[0]]), shards[0].rec, 0)
    finally:
        os.close(fd)
    header, img = rio.unpack_record(payload, f"{shards[0].rec}: record key 0")
    if header.flag != 2 or img:
        return None
    lo, hi = float(header.label[0]), float(header.label[1])
    if not (lo.is_integer() and hi.is_integer() and 1 <= lo <= hi):
        raise DatasetError(f"{shards[0].rec}: header record (key 0) has label [{lo:g}, {hi:g}]; "
                           "an InsightFace header needs integers 1 <= first_identity <= end")
    return 0, int(lo), int(hi)


def _open_insightface(shards, indexes, header, stated=None):
    _, lo, hi = header
    all_keys = np.concatenate([k for k, _ in indexes])
    sids_all = np.concatenate([np.full(k.size, i, np.int32) for i, (k, _) in enumerate(indexes)])
    offs_all = np.concatenate([o for _, o in indexes])
    uniq, first = np.unique(all_keys, return_index=True)
    if uniq.size != all_keys.size:
        dup = int(all_keys[np.setdiff1d(np.arange(all_keys.size), first)[0]])
        raise DatasetError(f"{shards[0].rec}: key {dup} appears twice across the shards of an "
                           "InsightFace dataset; the shards do not belong together")
    is_img = (all_keys >= 1) & (all_keys < lo)
    img_keys, img_sids, img_offs = all_keys[is_img], sids_all[is_img], offs_all[is_img]
    id_keys = np.arange(lo, hi, dtype=np.int64)
    if hi == lo:
        labels, counts = _scan_labels(shards, img_sids, img_keys, img_offs, stated)
        return "insightface", labels, img_sids, img_keys, img_offs, counts
    pos = np.searchsorted(uniq, id_keys)
    missing = (pos >= uniq.size) | (uniq[np.minimum(pos, uniq.size - 1)] != id_keys)
    if missing.any():
        raise DatasetError(f"{shards[0].rec}: identity record key {int(id_keys[missing][0])} "
                           f"(header says identity keys {lo}..{hi - 1}) is not in the index; "
                           "the dataset is incomplete")
    starts, ends = _identity_ranges(shards, sids_all[first[pos]], offs_all[first[pos]], lo)
    counts = ends - starts
    if (counts < 0).any() or (starts < 1).any() or (ends > lo).any():
        c = int(np.nonzero((counts < 0) | (starts < 1) | (ends > lo))[0][0])
        raise DatasetError(f"{shards[0].rec}: identity record key {lo + c} has range "
                           f"[{starts[c]}, {ends[c]}) outside the image keys [1, {lo})")
    labels = labels_from_ranges(starts, ends, img_keys)
    if (labels < 0).any():
        b = int(np.nonzero(labels < 0)[0][0])
        raise DatasetError(f"{shards[img_sids[b]].rec}: image record key {int(img_keys[b])} "
                           "is in no identity record's range; the dataset is corrupt")
    if int(counts.sum()) != img_keys.size:
        raise DatasetError(f"{shards[0].rec}: identity records cover {int(counts.sum())} images "
                           f"but the index lists {img_keys.size} image keys (overlapping "
                           "ranges or missing images)")
    return "insightface", labels.astype(np.int64), img_sids, img_keys, img_offs, counts


def _identity_ranges(shards, sids: np.ndarray, offs: np.ndarray, lo: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """[start, end) image keys of every class from its identity record (key lo + class)."""
    starts = np.empty(sids.size, np.int64)
    ends = np.empty(sids.size, np.int64)
    fds: dict = {}
    try:
        for c, (s, off) in enumerate(zip(sids.tolist(), offs.tolist())):
            fd = fds.get(s) or fds.setdefault(s, os.open(shards[s].rec, os.O_RDONLY))
            where = f"{shards[s].rec}: identity record key {lo + c}"
            h, _ = rio.unpack_record(rio.read_record_at(fd, off, shards[s].rec, lo + c)[0], where)
            if h.flag != 2:
                raise DatasetError(f"{where}: expected a 2-float label [first_image, end); got "
                                   f"flag {h.flag}")
            starts[c], ends[c] = int(h.label[0]), int(h.label[1])
    finally:
        for fd in fds.values():
            os.close(fd)
    return starts, ends


def _open_im2rec(shards, indexes, stated=None):
    keys = np.concatenate([k for k, _ in indexes])
    sids = np.concatenate([np.full(k.size, i, np.int32) for i, (k, _) in enumerate(indexes)])
    offs = np.concatenate([o for _, o in indexes])
    labels, counts = _scan_labels(shards, sids, keys, offs, stated)
    return "im2rec", labels, sids, keys, offs, counts


def labels_from_ranges(starts: np.ndarray, ends: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Class of each image key from identity ranges [starts[c], ends[c]); -1 where none."""
    by_start = np.lexsort((ends, starts))   # empty ranges sort before a real one at the same start
    j = np.searchsorted(starts[by_start], keys, side="right") - 1
    cls = by_start[np.maximum(j, 0)]
    ok = (j >= 0) & (keys < ends[cls]) & (keys >= starts[cls])
    return np.where(ok, cls, -1).astype(np.int64)


def read_label_at(fd: int, off: int, rec: Path, key: int) -> int:
    """Class label of the image record at `off` from its IRHeader alone (first float if many)."""
    head = os.pread(fd, 8 + rio.IR_SIZE + 4, off)
    where = f"{rec}: record key {key} at byte {off}"
    ok = len(head) == 8 + rio.IR_SIZE + 4
    if ok:
        magic, lrec = struct.unpack_from("<II", head)
        ok = magic == rio.MAGIC and (lrec >> 29) <= 1 and \
            (lrec & ((1 << 29) - 1)) >= rio.IR_SIZE + 4
    if ok:
        flag, lab = struct.unpack_from("<If", head, 8)
        h = rio.IRHeader(flag, [struct.unpack_from("<f", head, 32)[0]] if flag else lab, 0, 0)
    else:   # short, split or broken record: the full reader gives the precise error
        h, _ = rio.unpack_record(rio.read_record_at(fd, off, rec, key)[0], where)
    value = _label_of(h)
    if not value.is_integer() or value < 0:
        raise DatasetError(f"{where}: label {value:g} is not a class id (labels must be "
                           "integers >= 0)")
    return int(value)


def label_cache_stamp(shards: Sequence[ShardFiles]) -> list:
    return [(str(s.rec), s.rec.stat().st_size, s.rec.stat().st_mtime_ns,
             s.idx.stat().st_mtime_ns) for s in shards]


def _scan_labels(shards, sids, keys, offs, stated: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Labels of every image from its IRHeader; one scan, cached beside the data.

    `stated`: the class count of a `property` file, if any. Without one, the class count is the
    largest label + 1, which `check_label_range` keeps from being absurd before it is allocated."""
    cache = cache_path_for(shards[0].rec, "labels.npy")
    stamp = label_cache_stamp(shards)
    labels = load_cached(cache, stamp)
    if labels is None or labels.size != keys.size:
        labels = np.empty(keys.size, np.int64)
        fds = [os.open(s.rec, os.O_RDONLY) for s in shards]
        try:
            for i in range(keys.size):
                s = int(sids[i])
                labels[i] = read_label_at(fds[s], int(offs[i]), shards[s].rec, int(keys[i]))
        finally:
            for fd in fds:
                os.close(fd)
        save_cached(cache, stamp, labels)
    check_label_range(labels, stated, shards, sids, keys)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    return labels, counts.astype(np.int64)


# Without a `property` file the classifier gets one row per label up to the largest: a dataset
# whose largest label needs more than this many empty rows (and more empty rows than classes
# with images) is refused as a label error rather than allocated.
MAX_EMPTY_CLASSES = 1000


def check_label_range(labels: np.ndarray, stated: Optional[int], shards: Sequence[ShardFiles],
                      sids: np.ndarray, keys: np.ndarray) -> None:
    """Refuse, naming the record, a label that would size the classifier absurdly: one at or past
    a `property` file's class count, or (with no property file) one far beyond the number of
    distinct labels, e.g. a single label 300,000,000 asking for a 38 GB classifier. Runs before
    the per-class counts (and any classifier) are allocated."""
    if labels.size == 0:
        return
    top = int(np.argmax(labels))
    largest = int(labels[top])
    where = f"{shards[int(sids[top])].rec}: record key {int(keys[top])}"
    prop = shards[0].rec.parent / PROPERTY
    if stated is not None:
        if largest >= stated:
            bad = int(np.argmax(labels >= stated))          # the first record past it
            raise DatasetError(f"{shards[int(sids[bad])].rec}: record key {int(keys[bad])} has "
                               f"label {int(labels[bad])}, outside [0, {stated}) set by {prop}; "
                               "fix the label or the property file")
        return
    distinct = int(np.unique(labels).size)
    empty = largest + 1 - distinct
    if empty > MAX_EMPTY_CLASSES and empty > distinct:
        raise DatasetError(
            f"{where} has label {largest}, but the {labels.size} images carry only {distinct} "
            f"distinct labels: without a property file the class count is the largest label + 1, "
            f"{largest + 1} classifier rows of which {empty} have no image. Fix the label or "
            f"number the classes 0..{distinct - 1}; if that many classes are meant, state the "
            f"class count in {prop} as `{largest + 1},HEIGHT,WIDTH`")

