"""Write an InsightFace-layout dataset (header, images, identity records, property) atomically.

Every file is written under a temporary name and renamed only once everything succeeded, so an
interrupted run never leaves a half-written dataset under the real name.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from facetrain.data import recordio as rio

PROPERTY = "property"
_MAX_FLOAT_KEY = 1 << 24  # InsightFace stores record keys as float32 labels: exact up to 2^24


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends (a commit of several renames runs whole);
    a signal that came meanwhile is then re-raised to the handler that was in place. Handlers
    (not a signal mask) so that a signal delivered to another thread, e.g. a progress bar's,
    waits too. Outside the main thread, where handlers cannot be set, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    held = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


class _ShardedWriter:
    """Records with one key space split over `prefix_000.rec, ...` (or `prefix.rec`)."""

    def __init__(self, prefix: Path, shard_size: Optional[int]):
        self.prefix = prefix
        self.shard_size = shard_size
        self.writers: List[rio.IndexedRecordWriter] = []
        self._in_shard = 0

    def _name(self, i: int) -> Path:
        if self.shard_size is None:
            return self.prefix.with_name(self.prefix.name + ".rec")
        return self.prefix.with_name(f"{self.prefix.name}_{i:03d}.rec")

    def _current(self, new_image: bool) -> rio.IndexedRecordWriter:
        full = self.shard_size is not None and new_image and self._in_shard >= self.shard_size
        if not self.writers or full:
            self.writers.append(rio.IndexedRecordWriter(self._name(len(self.writers))))
            self._in_shard = 0
        return self.writers[-1]

    def write(self, key: int, payload: bytes, image: bool) -> None:
        with self.guard():
            self._current(image).write(key, payload)
        self._in_shard += int(image)

    def write_framed(self, key: int, framed: bytes) -> None:
        with self.guard():
            self._current(True).write_raw(key, framed)
        self._in_shard += 1

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Output-side OSErrors (disk full, ...) become OutputWriteError naming the files;
        input-side errors never pass through here, so they keep their own messages."""
        try:
            yield
        except rio.OutputWriteError:
            raise
        except OSError as exc:
            raise _write_failed(self.prefix, self.temp_paths(), exc) from exc

    def temp_paths(self) -> List[Path]:
        return [p for w in self.writers for p in w.temp_paths]

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def _write_failed(prefix: Path, temps: Sequence[Path], cause: OSError) -> rio.OutputWriteError:
    removed = ", ".join(str(t) for t in temps) or "none had been created"
    return rio.OutputWriteError(
        f"cannot write the dataset {prefix}: {cause.strerror or cause} "
        f"({errno.errorcode.get(cause.errno or 0, 'error')}); the partial temporary files were "
        f"removed ({removed}) and nothing under {prefix} changed; {rio.write_advice(cause)}, "
        "then run again", cause)


def dataset_files(prefix: Path) -> List[Path]:
    """Existing files that belong to the dataset at `prefix`: `prefix.rec/.idx`, shards
    `prefix_NNN.rec/.idx` and the caches derived from them (labels.npy + stamp, images.idx).
    Nothing else: a user's `train.json` or `train_designs.csv` is not the dataset's."""
    pattern = re.compile(re.escape(prefix.name) +
                         r"(_\d+)?\.(rec|idx|labels\.npy|labels\.npy\.json|images\.idx)")
    if not prefix.parent.is_dir():
        return []
    return sorted(f for f in prefix.parent.iterdir() if f.is_file() and pattern.fullmatch(f.name))


def remove_dataset(prefix: Path) -> None:
    """Delete an existing dataset (and its derived caches) at `prefix` before replacing it."""
    for f in dataset_files(prefix):
        f.unlink()


def write_insightface_dataset(path_prefix: Union[str, Path], items: Iterable[Tuple[int, bytes]],
                              num_classes: int, image_size: Union[int, Sequence[int]],
                              shard_size: Optional[int] = None, framed: bool = False) -> int:
    """Write images (label, encoded bytes) grouped by label; return the image count.

    Keys: 0 header, 1..N images, N+1..N+C identity records (class c = key N+1+c). With
    shard_size, images are split into `prefix_000.rec`, `prefix_001.rec`, ... of at most
    shard_size images each (header in the first shard, identity records in the last). With
    framed=True each item's bytes are a whole framed record to copy unchanged (its IRHeader
    label must already be the new label). `property` (`num_classes,h,w`) goes in the folder.
    """
    prefix = Path(path_prefix)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 or None; got {shard_size}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = _ShardedWriter(prefix, shard_size)
    prop_tmp = prefix.parent / f".{PROPERTY}.tmp{os.getpid()}"
    try:
        # Placeholder header, patched once the image count is known (same byte length).
        out.write(0, rio.pack_irheader([0.0, 0.0], 0, 0, b""), image=False)
        starts, ends, key = _write_images(out, items, num_classes, framed, prefix)
        lo, hi = key, key + num_classes
        if hi > _MAX_FLOAT_KEY:
            raise ValueError(f"{prefix}: {hi} records exceed the 2^24 keys the InsightFace layout "
                             "can store in float32 labels; split the data into datasets")
        for c in range(num_classes):
            a, b = (starts[c], ends[c]) if starts[c] >= 0 else (lo, lo)
            out.write(lo + c, rio.pack_irheader([float(a), float(b)], lo + c, 0, b""),
                      image=False)
        with out.guard():
            _patch_header(out.writers[0], lo, hi)
            prop_tmp.write_text(f"{num_classes},{h},{w}\n")
            for wr in out.writers:
                wr.flush()      # a full disk fails here, before the old dataset is touched
            with signals_deferred():    # the renames run whole: never half old, half new
                remove_dataset(prefix)
                for wr in out.writers:
                    wr.close()
                os.replace(prop_tmp, prefix.parent / PROPERTY)
    except BaseException:   # errors, KeyboardInterrupt, Terminated (SIGTERM): no temp left
        out.abort()
        raise
    finally:
        prop_tmp.unlink(missing_ok=True)
    return lo - 1


def _write_images(out: _ShardedWriter, items: Iterable[Tuple[int, bytes]], num_classes: int,
                  framed: bool, prefix: Path) -> Tuple[np.ndarray, np.ndarray, int]:
    """Write image records as keys 1, 2, ...; return per-class [start, end) keys and next key."""
    starts = np.full(num_classes, -1, np.int64)
    ends = np.full(num_classes, -1, np.int64)
    key, current = 1, -1
    for label, data in items:
        label = int(label)
        if not 0 <= label < num_classes:
            raise ValueError(f"{prefix}: item {key - 1} has label {label}, outside "
                             f"[0, {num_classes})")
        if label != current:
            if starts[label] >= 0:
                raise ValueError(f"{prefix}: items must be grouped by label; label {label} "
                                 f"reappears at item {key - 1}")
            if current >= 0:
                ends[current] = key
            starts[label], current = key, label
        if framed:
            out.write_framed(key, data)
        else:
            out.write(key, rio.pack_irheader(float(label), key, 0, data), image=True)
        key += 1
    if current >= 0:
        ends[current] = key
    return starts, ends, key


def _patch_header(first: rio.IndexedRecordWriter, lo: int, hi: int) -> None:
    """Overwrite the placeholder header record (offset 0) with labels [lo, hi]; same length,
    and positive float labels can never contain the magic word, so no re-framing."""
    first._rec.flush()
    header = rio.encode_record(rio.pack_irheader([float(lo), float(hi)], 0, 0, b""))
    first._rec.seek(0)
    first._rec.write(header)
    first._rec.seek(0, os.SEEK_END)


def relabel_framed(framed: bytes, new_label: int, new_key: int) -> bytes:
    """Copy of a framed image record with a new scalar label and id; image bytes untouched.

    Only the 24-byte IRHeader (right after the 8-byte frame header) changes, so no re-framing is
    needed unless the record had multi-float labels (then it is unpacked and re-encoded).
    """
    flag = struct.unpack_from("<I", framed, 8)[0]
    cflag = struct.unpack_from("<I", framed, 4)[0] >> 29
    if flag == 0 and cflag == 0:
        return framed[:8] + struct.pack("<IfQQ", 0, float(new_label), new_key,
                                        struct.unpack_from("<Q", framed, 24)[0]) + framed[32:]
    payload = _unframe(framed)
    _, img = rio.unpack_record(payload)
    return rio.encode_record(rio.pack_irheader(float(new_label), new_key, 0, img))


def _unframe(framed: bytes) -> bytes:
    parts, pos = [], 0
    while True:
        magic, lrec = struct.unpack_from("<II", framed, pos)
        cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append(framed[pos + 8:pos + 8 + n])
        pos += 8 + ((n + 3) & ~3)
        if cflag in (0, 3):
            return b"".join(parts)
        parts.append(struct.pack("<I", rio.MAGIC))
