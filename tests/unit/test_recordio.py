"""RecordIO codec against hand-framed bytes (dmlc-core / mxnet rules) and byte-level fixtures."""
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from facetrain.data import recordio as rio

FIX = Path(__file__).resolve().parents[1] / "fixtures"
MAGIC = struct.pack("<I", 0xCED7230A)


def test_pack_matches_mxnet_pack_bytes():
    # mxnet recordio.pack: scalar label -> flag 0; sequence -> flag n, label field 0, floats first.
    assert rio.pack_irheader(3.0, 7, 1, b"img") == struct.pack("IfQQ", 0, 3.0, 7, 1) + b"img"
    multi = rio.pack_irheader([1.5, -2.0], 9, 0, b"xy")
    assert multi == struct.pack("IfQQ", 2, 0.0, 9, 0) + struct.pack("<2f", 1.5, -2.0) + b"xy"
    h, img = rio.unpack_record(multi)
    assert h.flag == 2 and h.id == 9 and img == b"xy"
    np.testing.assert_array_equal(h.label, np.array([1.5, -2.0], np.float32))
    h, img = rio.unpack_record(rio.pack_irheader(3.0, 7, 1, b"img"))
    assert (h.flag, h.label, h.id, h.id2, img) == (0, 3.0, 7, 1, b"img")


def test_encode_splits_only_aligned_magic_and_pads():
    aligned = b"abcd" + MAGIC + b"efgh" + MAGIC + b"xy"          # magic at 4 and 12
    want = (MAGIC + struct.pack("<I", (1 << 29) | 4) + b"abcd"
            + MAGIC + struct.pack("<I", (2 << 29) | 4) + b"efgh"
            + MAGIC + struct.pack("<I", (3 << 29) | 2) + b"xy\0\0")
    assert rio.encode_record(aligned) == want
    unaligned = b"z" + MAGIC + b"12"                               # magic at 1: not split
    assert rio.encode_record(unaligned) == MAGIC + struct.pack("<I", 7) + unaligned + b"\0"
    leading = MAGIC + b"ab"                                        # magic at 0: empty first part
    assert rio.encode_record(leading) == (MAGIC + struct.pack("<I", 1 << 29)
                                          + MAGIC + struct.pack("<I", (3 << 29) | 2) + b"ab\0\0")
    assert rio.encode_record(b"") == MAGIC + struct.pack("<I", 0)


def test_writer_reproduces_fixture_bytes(tmp_path):
    recs = [rio.pack_irheader([4.0, 6.0], 0, 0, b""),
            rio.pack_irheader(0.0, 1, 0, b"abcd" + MAGIC + b"efgh" + MAGIC + b"xy"),
            rio.pack_irheader(0.0, 2, 0, b"z" + MAGIC + b"12"),
            rio.pack_irheader(1.0, 3, 0, b"IMAGE3!!"),
            rio.pack_irheader([1.0, 3.0], 4, 0, b""),
            rio.pack_irheader([3.0, 4.0], 5, 0, b"")]
    with rio.IndexedRecordWriter(tmp_path / "x.rec") as w:
        for k, r in enumerate(recs):
            w.write(k, r)
    assert (tmp_path / "x.rec").read_bytes() == (FIX / "insightface.rec").read_bytes()
    assert (tmp_path / "x.idx").read_text() == (FIX / "insightface.idx").read_text()


def test_reader_random_access_and_scan_of_fixture():
    r = rio.IndexedRecordReader(FIX / "insightface.rec")
    assert r.keys.tolist() == [0, 1, 2, 3, 4, 5]
    h, img = rio.unpack_record(r.read_idx(1))            # the 3-part record, magic restored
    assert img == b"abcd" + MAGIC + b"efgh" + MAGIC + b"xy" and h.label == 0.0
    h, img = rio.unpack_record(r.read_idx(2))
    assert img == b"z" + MAGIC + b"12"
    h, _ = rio.unpack_record(r.read_idx(0))
    assert h.flag == 2 and h.label.tolist() == [4.0, 6.0]
    scanned = list(r.scan())
    assert [o for o, _ in scanned] == r.offsets.tolist()
    assert [p for _, p in scanned] == [r.read_idx(k) for k in range(6)]
    r.close()


def test_multifloat_fixture():
    r = rio.IndexedRecordReader(FIX / "multilabel.rec")
    h, img = rio.unpack_record(r.read_idx(1))
    assert h.flag == 3 and img == b"cd"
    np.testing.assert_array_equal(h.label, np.array([7.0, 0.25, 9.0], np.float32))
    assert rio.pack_irheader(h.label, 1, 0, img) == r.read_idx(1)


def test_wrong_magic_and_truncation_name_file_and_offset(tmp_path):
    rec = tmp_path / "bad.rec"
    data = bytearray((FIX / "insightface.rec").read_bytes())
    data[140:144] = b"\0\0\0\0"                             # record key 3 at byte 140
    rec.write_bytes(bytes(data))
    shutil.copy(FIX / "insightface.idx", tmp_path / "bad.idx")
    r = rio.IndexedRecordReader(rec)
    with pytest.raises(rio.RecordIOError, match=r"bad\.rec: record key 3 at byte 140: wrong magic"):
        r.read_idx(3)
    rec.write_bytes((FIX / "insightface.rec").read_bytes()[:200])   # cut inside key 4
    r = rio.IndexedRecordReader(rec)
    # One message, whether an index read or a scan finds it: the .rec must be re-copied.
    msg = r"bad\.rec is truncated: the file ends at byte 200, inside the record that starts at " \
          r"byte 180; .*re-copy it"
    with pytest.raises(rio.TruncatedRecordError, match=msg):
        r.read_idx(4)
    with pytest.raises(rio.TruncatedRecordError, match=msg):
        list(rio.scan_records(rec))


def test_bad_idx_line_and_rebuild(tmp_path):
    shutil.copy(FIX / "insightface.rec", tmp_path / "a.rec")
    (tmp_path / "a.idx").write_text("0\t0\nfoo\t40\n")
    with pytest.raises(rio.RecordIOError, match=r"a\.idx: line 2"):
        rio.read_index(tmp_path / "a.idx")
    assert rio.rebuild_index(tmp_path / "a.rec") == 6
    assert (tmp_path / "a.idx").read_text() == (FIX / "insightface.idx").read_text()
    chunks = list(rio.iter_index_chunks(tmp_path / "a.idx", chunk_bytes=7))
    assert np.concatenate([k for k, _ in chunks]).tolist() == list(range(6))


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with rio.IndexedRecordWriter(tmp_path / "t.rec") as w:
            w.write(0, b"abc")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
