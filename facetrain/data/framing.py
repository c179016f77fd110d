"""Does a .idx still describe its .rec? Framing checked at every indexed offset, cheaply.

Why every offset: checking only the last record misses an index whose offsets point into the
middle of records (a .rec rewritten with other images), which then fails deep inside training.
Each offset costs one 8-byte gather from a memory map (magic word, continuation flag, length), so
even millions of records take seconds. The checks stream over index chunks (bounded memory).
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from facetrain.data import recordio as rio
from facetrain.data.errors import StaleIndexError

_LEN_MASK = (1 << 29) - 1
_HEAD = np.arange(8, dtype=np.int64)


class FramingCheck:
    """Checks (keys, offsets) chunks of one shard's index against its .rec; `finish()` then checks
    that the last record ends where the file ends. Raises StaleIndexError for an index that does
    not match, rio.TruncatedRecordError for a .rec that was cut short."""

    def __init__(self, rec: Path, idx: Path):
        self.rec, self.idx = Path(rec), Path(idx)
        self.size = self.rec.stat().st_size
        self._fh = open(self.rec, "rb")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._bytes = np.frombuffer(self._map, np.uint8) if self._map is not None else None
        self.checked = 0
        self._last_key, self._last_off = -1, -1

    def _stale(self, what: str, note: str = "", verb: str = "is stale") -> StaleIndexError:
        return StaleIndexError(f"index file {self.idx} {verb}: {what}; "
                               f"{rio.rebuild_advice(self.rec)}{note}")

    def check(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        """Check one chunk of index entries (keys and byte offsets, int64)."""
        offsets = np.asarray(offsets, np.int64)
        bad = np.nonzero((offsets < 0) | (offsets + 8 > self.size))[0]
        first_bad = int(bad[0]) if bad.size else offsets.size
        ok = offsets[:first_bad]
        if ok.size:
            head = self._bytes[ok[:, None] + _HEAD].view("<u4")
            magic, lrec = head[:, 0], head[:, 1]
            cflag, length = lrec >> 29, (lrec & _LEN_MASK).astype(np.int64)
            wrong = (magic != rio.MAGIC) | (cflag > 1) | (ok + 8 + length > self.size)
            if wrong.any():
                j = int(np.nonzero(wrong)[0][0])
                self._raise_framing(int(keys[j]), int(ok[j]), int(magic[j]), int(cflag[j]))
            top = int(ok.argmax())
            if ok[top] > self._last_off:
                self._last_key, self._last_off = int(keys[top]), int(ok[top])
        if first_bad < offsets.size:
            self._raise_out_of_range(int(keys[first_bad]), int(offsets[first_bad]))
        self.checked += int(offsets.size)

    def _raise_framing(self, key: int, off: int, magic: int, cflag: int) -> None:
        if magic != rio.MAGIC:
            raise self._stale(f"key {key} points at byte {off}, where no record starts (found "
                              f"0x{magic:08x}, not the magic word 0x{rio.MAGIC:08x})",
                              f" (the rebuild scans {self.rec.name} from its start and says so "
                              "if the .rec itself is damaged)", verb=f"does not match {self.rec}")
        if cflag > 1:
            raise self._stale(f"key {key} points at byte {off} of {self.rec}, inside a split "
                              f"record (continuation flag {cflag})")
        raise rio.TruncatedRecordError(rio.truncated_message(self.rec, off, self.size))

    def _raise_out_of_range(self, key: int, off: int) -> None:
        if 0 <= off < self.size and self._bytes is not None:
            tail = self._bytes[off:off + 4].tobytes()
            if struct.pack("<I", rio.MAGIC).startswith(tail):   # a record header cut short
                raise rio.TruncatedRecordError(rio.truncated_message(self.rec, off, self.size))
        raise self._stale(f"key {key} points at byte {off}, past the end of {self.rec} "
                          f"({self.size} bytes)", f" (or, if {self.rec.name} was cut short, "
                          "re-copy it)")

    def finish(self) -> None:
        """After every chunk: the record at the largest offset must end at the end of the file."""
        if self._last_off < 0:
            if self.size:
                raise self._stale(f"it lists no record but {self.rec} holds {self.size} bytes")
            return
        fd = self._fh.fileno()
        _, end = rio.read_record_at(fd, self._last_off, self.rec, self._last_key)
        if end != self.size:
            raise self._stale(f"its last record ends at byte {end} but {self.rec} has "
                              f"{self.size} bytes")

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            self._map.close()
            self._map = None
        self._fh.close()

    def __enter__(self) -> "FramingCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_framing(rec: Path, idx: Path, keys: np.ndarray, offsets: np.ndarray,
                  progress: Optional[Callable[[int], None]] = None,
                  chunk: int = 1 << 18) -> None:
    """Check a whole in-memory index; `progress(n)` after every `chunk` entries."""
    with FramingCheck(rec, idx) as fc:
        for a in range(0, max(offsets.size, 1), chunk):
            fc.check(keys[a:a + chunk], offsets[a:a + chunk])
            if progress is not None:
                progress(int(offsets[a:a + chunk].size))
        fc.finish()


def check_framing_streaming(rec: Path, idx: Path,
                            progress: Optional[Callable[[int], None]] = None) -> int:
    """Check an index read in bounded chunks (for inputs too large to index in memory);
    return the number of entries checked."""
    if not Path(rec).is_file():
        raise FileNotFoundError(f"record file {rec} does not exist")
    if not Path(idx).is_file():
        raise rio.missing_index_error(rec, idx)
    with FramingCheck(rec, idx) as fc:
        for keys, offs in rio.iter_index_chunks(idx):
            fc.check(keys, offs)
            if progress is not None:
                progress(int(offs.size))
        fc.finish()
        return fc.checked
