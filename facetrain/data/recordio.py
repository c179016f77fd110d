"""MXNet IndexedRecordIO, read and written byte for byte without mxnet.

Record framing (dmlc-core `recordio.cc`): `uint32 magic 0xced7230a`, `uint32 lrecord` (upper 3
bits: continuation flag, lower 29 bits: length), the part's bytes, zero padding to 4 bytes. A
payload that holds the magic word at a 4-byte-aligned position is written as several parts
(flag 1 = first, 2 = middle, 3 = last) with that magic word removed; readers put it back.
Payload (mxnet `recordio.pack`): IRHeader `IfQQ` (flag, label, id, id2), then `flag` float32
labels when flag > 0 (header.label is then 0), then the encoded image.
The `.idx` file is text, one `key<TAB>offset` line per record (offset of the record's magic).
"""
from __future__ import annotations

import errno
import numbers
import os
import struct
import warnings
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1
MAX_PART = 1 << 29

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = ("Image record header: flag (0 = scalar label, n > 0 = n float labels), label "
                    "(float, or a float32 array when flag > 0), id and id2 (uint64).")


class RecordIOError(ValueError):
    """A malformed RecordIO file or index; the message names the file and the key or offset."""


class TruncatedRecordError(RecordIOError):
    """The .rec ends inside a record: only a new copy helps (no index can restore lost bytes)."""


REBUILD_CALL = "facetrain.data.shards.rebuild_indexes"   # what rebuild_advice names


def rebuild_advice(rec: Union[str, Path]) -> str:
    """What to do about a stale, malformed or missing .idx; each option works when followed."""
    return (f"rebuild it with {REBUILD_CALL}({str(rec)!r}) or set "
            "data.rebuild_index=true")


def missing_index_error(rec: Union[str, Path], idx: Union[str, Path]) -> FileNotFoundError:
    return FileNotFoundError(f"index file {idx} is missing; {rebuild_advice(rec)}")


def truncated_message(path: Union[str, Path], offset: int, size: int) -> str:
    """The one message for a cut-short .rec, the same whether an index or a scan found it."""
    return (f"{path} is truncated: the file ends at byte {size}, inside the record that starts "
            f"at byte {offset}; it was cut short (an interrupted copy or download?): re-copy it "
            "from its source (rebuilding the index cannot bring back missing bytes)")


def damaged_message(path: Union[str, Path], pos: int, found: str) -> str:
    """A scan from byte 0 found no record where the previous one ends: the .rec itself is bad."""
    return (f"{path} is damaged at byte {pos}: {found} where the previous record (or part) "
            "ends, so no index can be built past it; the file is corrupt or not RecordIO: "
            "re-copy it from its source")


def _upper4(n: int) -> int:
    return (n + 3) & ~3


def pack_irheader(label: Union[float, Sequence[float], np.ndarray], id: int, id2: int,
                  img_bytes: bytes) -> bytes:
    """Payload for one record: IRHeader + optional float32 labels + image bytes (mxnet `pack`)."""
    if isinstance(label, numbers.Number):
        return struct.pack(_IR_FORMAT, 0, float(label), int(id), int(id2)) + bytes(img_bytes)
    arr = np.asarray(label, dtype="<f4").reshape(-1)
    return struct.pack(_IR_FORMAT, arr.size, 0.0, int(id), int(id2)) + arr.tobytes() + \
        bytes(img_bytes)


def unpack_record(payload: bytes, where: str = "record") -> Tuple[IRHeader, bytes]:
    """Split a payload into (IRHeader, image bytes); multi-float labels become a float32 array."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: payload of {len(payload)} bytes is shorter than the "
                            f"{IR_SIZE}-byte IRHeader; the file is corrupt or not an image record")
    flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, payload, 0)
    body = payload[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader says {flag} float labels but only "
                                f"{len(body)} bytes follow the header")
        label = np.frombuffer(body, dtype="<f4", count=flag).astype(np.float32)
        body = body[4 * flag:]
    return IRHeader(flag, label, id_, id2), bytes(body)


def encode_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc-core's RecordIOWriter::WriteRecord does."""
    n = len(payload)
    if n >= MAX_PART:
        raise RecordIOError(f"a record payload of {n} bytes exceeds RecordIO's 2^29-byte limit")
    parts: List[bytes] = []
    start = 0
    # The writer only looks for the magic at 4-byte-aligned positions of the payload.
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n & ~3):
        if pos % 4 == 0:
            flag = 1 if start == 0 else 2
            parts.append(struct.pack("<II", MAGIC, (flag << 29) | (pos - start)))
            parts.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    flag = 3 if start != 0 else 0
    parts.append(struct.pack("<II", MAGIC, (flag << 29) | (n - start)))
    parts.append(payload[start:])
    parts.append(b"\0" * (_upper4(n) - n))
    return b"".join(parts)


def read_record_at(fd: int, offset: int, path: Union[str, Path], key: object = None,
                   file_size: Optional[int] = None, scanning: bool = False) -> Tuple[bytes, int]:
    """Read the record starting at `offset` of an open file; return (payload, offset after it).

    Errors name the file, the key (when known) and the byte offset. With `scanning` (the offset
    is where the previous record ended, not an index entry) a bad header means a damaged .rec,
    and the message says so instead of blaming the index.
    """
    where = f"{path}: record" + (f" key {key}" if key is not None else "") + f" at byte {offset}"
    chunks: List[bytes] = []
    pos = offset
    first = True
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise TruncatedRecordError(truncated_message(path, offset, os.fstat(fd).st_size))
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            if scanning or not first:
                raise RecordIOError(damaged_message(
                    path, pos, f"wrong magic word 0x{magic:08x} (expected 0x{MAGIC:08x})"))
            raise RecordIOError(f"{where}: wrong magic word 0x{magic:08x} at byte {pos} "
                                f"(expected 0x{MAGIC:08x}); the .idx does not match the .rec "
                                f"({rebuild_advice(path)}) or the file is not RecordIO")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if first and cflag not in (0, 1):
            if scanning:
                raise RecordIOError(damaged_message(
                    path, pos, f"a continuation part (flag {cflag}) with no first part"))
            raise RecordIOError(f"{where}: starts with continuation flag {cflag}; the offset "
                                "points inside a split record (stale .idx: rebuild it)")
        if not first and cflag not in (2, 3):
            raise RecordIOError(f"{where}: continuation part at byte {pos} has flag {cflag}; "
                                "expected 2 or 3; the .rec is damaged: re-copy it from its source")
        body = os.pread(fd, _upper4(length), pos + 8)
        if len(body) < length:
            raise TruncatedRecordError(truncated_message(path, offset, os.fstat(fd).st_size))
        chunks.append(body[:length])
        pos += 8 + _upper4(length)
        if cflag in (0, 3):
            break
        chunks.append(_MAGIC_BYTES)
        first = False
    return b"".join(chunks), pos


def read_framed_at(fd: int, offset: int, path: Union[str, Path], key: object = None) -> bytes:
    """The raw bytes of the record at `offset` (frame headers, parts, padding), for copying."""
    buf = os.pread(fd, 16384, offset)
    if len(buf) >= 8:
        magic, lrec = struct.unpack_from("<II", buf)
        if magic == MAGIC and lrec >> 29 == 0:
            n = 8 + _upper4(lrec & _LEN_MASK)
            if n > len(buf):
                buf += os.pread(fd, n - len(buf), offset + len(buf))
            if len(buf) >= n:
                return buf[:n]
    _, end = read_record_at(fd, offset, path, key)   # split or broken: precise checks and errors
    return os.pread(fd, end - offset, offset)


def scan_records(path: Union[str, Path]) -> Iterator[Tuple[int, bytes]]:
    """Yield (offset, payload) for every record of a .rec file in file order (no index needed)."""
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            payload, nxt = read_record_at(fd, pos, path, scanning=True)
            yield pos, payload
            pos = nxt
    finally:
        os.close(fd)


def read_index(idx_path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Parse a .idx file into (keys int64 [n], offsets int64 [n]) in file order.

    Keys must be integers (im2rec and InsightFace write integers).
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise missing_index_error(idx_path.with_suffix(".rec"), idx_path)
    text = idx_path.read_bytes()
    lines = text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)
    flat = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = np.fromstring(text.decode("ascii"), dtype=np.int64, sep=" ")
    except (ValueError, UnicodeDecodeError):
        pass
    if flat is None or flat.size != 2 * lines:
        bad = 0
        for bad, line in enumerate(text.splitlines()):
            parts = line.split()
            if len(parts) != 2 or not all(x.isdigit() for x in parts):
                break
        raise RecordIOError(f"{idx_path}: line {bad + 1} is not `integer_key<TAB>byte_offset`; "
                            f"{rebuild_advice(idx_path.with_suffix('.rec'))}")
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def iter_index_chunks(idx_path: Union[str, Path], chunk_bytes: int = 1 << 22
                      ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(keys, offsets) int64 arrays of a .idx file, a bounded chunk at a time (streaming)."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise missing_index_error(idx_path.with_suffix(".rec"), idx_path)
    rest = b""
    line0 = 0
    with open(idx_path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            data = rest + block
            if not block:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1
            part, rest = data[:cut], data[cut:]
            if part.strip():
                lines = part.count(b"\n") + (0 if part.endswith(b"\n") else 1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        flat = np.fromstring(part.decode("ascii"), dtype=np.int64, sep=" ")
                    except (ValueError, UnicodeDecodeError):
                        flat = np.empty(0, np.int64)
                if flat.size != 2 * lines:
                    raise RecordIOError(f"{idx_path}: a line near line {line0 + 1} is not "
                                        "`integer_key<TAB>byte_offset`; "
                                        f"{rebuild_advice(idx_path.with_suffix('.rec'))}")
                line0 += lines
                pairs = flat.reshape(-1, 2)
                yield pairs[:, 0], pairs[:, 1]
            if not block:
                return


def _atomic_paths(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class IndexedRecordWriter:
    """Write a .rec/.idx pair; both appear under their final names only on `close()`.

    Use as a context manager: an exception inside the block removes the temporary files, so a
    crash never leaves a half-written dataset under the real name.
    """

    def __init__(self, rec_path: Union[str, Path], idx_path: Union[str, Path, None] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self._rec_tmp = _atomic_paths(self.rec_path)
        self._idx_tmp = _atomic_paths(self.idx_path)
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._rec = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w", encoding="ascii")
        self._pos = 0
        self.count = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under integer `key`; return its byte offset."""
        data = encode_record(payload)
        off = self._pos
        self._rec.write(data)
        self._idx.write(f"{int(key)}\t{off}\n")
        self._pos += len(data)
        self.count += 1
        return off

    def write_raw(self, key: int, framed: bytes) -> int:
        """Append an already framed record (bytes copied unchanged from another .rec)."""
        off = self._pos
        self._rec.write(framed)
        self._idx.write(f"{int(key)}\t{off}\n")
        self._pos += len(framed)
        self.count += 1
        return off

    @property
    def temp_paths(self) -> Tuple[Path, Path]:
        """The hidden files written until `close()` renames them (named in error messages)."""
        return self._rec_tmp, self._idx_tmp

    def flush(self) -> None:
        """Push buffered bytes to the temporary files (a full disk shows up here, not later)."""
        self._rec.flush()
        self._idx.flush()

    def close(self) -> None:
        """Rename the temporary files to the final names; on any failure remove them instead."""
        if self._rec.closed:
            return
        try:
            self._rec.close()
            self._idx.close()
            os.replace(self._rec_tmp, self.rec_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary files (nothing appears under the final names)."""
        for fh in (self._rec, self._idx):
            try:
                fh.close()
            except OSError:     # e.g. the buffered tail cannot be flushed to a full disk
                pass
        for tmp in (self._rec_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedRecordReader:
    """Random access by key (via the .idx) and sequential scan of one .rec file.

    Opens its file lazily per process, so it can be pickled into DataLoader workers.
    """

    def __init__(self, rec_path: Union[str, Path], idx_path: Union[str, Path, None] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"record file {self.rec_path} does not exist")
        keys, offsets = read_index(self.idx_path)
        self.keys = keys
        self.offsets = offsets
        self._pos = {int(k): int(o) for k, o in zip(keys, offsets)}
        self._fd: Optional[int] = None
        self._pid = -1

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read_idx(self, key: int) -> bytes:
        """Payload of the record stored under `key`."""
        if key not in self._pos:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        return read_record_at(self._file(), self._pos[key], self.rec_path, key)[0]

    def scan(self) -> Iterator[Tuple[int, bytes]]:
        """(offset, payload) of every record in file order."""
        return scan_records(self.rec_path)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state


def rebuild_index(rec_path: Union[str, Path], idx_path: Union[str, Path, None] = None,
                  start_key: int = 0, progress: Optional[Callable[[int], None]] = None) -> int:
    """Write a fresh .idx for a .rec by scanning it (atomic); return the record count.

    Keys are start_key, start_key+1, ... in file order: what im2rec and InsightFace write for a
    single file (start_key=0) and what our sharded writer writes (keys continue across shards).
    `progress(n)` is called with the bytes scanned since its last call (for a progress bar).
    The temporary .idx is removed on every exit path (error, KeyboardInterrupt, SystemExit).
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    if not rec_path.is_file():
        raise FileNotFoundError(f"record file {rec_path} does not exist")
    tmp = _atomic_paths(idx_path)
    n = 0
    done = 0
    lines: List[str] = []
    try:
        with writing_to(idx_path, tmp):
            fh = open(tmp, "w", encoding="ascii")
        try:
            for off, _ in scan_records(rec_path):
                lines.append(f"{start_key + n}\t{off}\n")
                n += 1
                if n % 4096 == 0:
                    with writing_to(idx_path, tmp):
                        fh.writelines(lines)
                    lines.clear()
                    if progress is not None:
                        progress(off - done)
                        done = off
            with writing_to(idx_path, tmp):
                fh.writelines(lines)
                fh.close()
                os.replace(tmp, idx_path)
        finally:
            try:
                fh.close()
            except OSError:
                pass
        if progress is not None:
            progress(rec_path.stat().st_size - done)
    finally:    # error, KeyboardInterrupt, SIGTERM (as an exception): no temporary .idx left
        tmp.unlink(missing_ok=True)
    return n


@contextmanager
def writing_to(target: Path, tmp: Path) -> Iterator[None]:
    """An OSError while writing `tmp` (disk full, ...) becomes one that names both files; the
    caller removes `tmp` (in a `finally`) before the error reaches the user."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(f"cannot write {target}: {exc.strerror or exc} (the partial "
                               f"temporary file {tmp} was removed; {target} is unchanged); "
                               f"{write_advice(exc)}, then run again", exc) from exc


def write_advice(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or write elsewhere)"
    return "fix the cause"


class OutputWriteError(OSError):
    """Writing an output failed (disk full, ...); the message names the target and says the
    partial temporary files were removed (the writer removes them before this propagates)."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message
