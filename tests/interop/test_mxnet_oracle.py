"""Our RecordIO codec against the real mxnet 1.9.1 (run in the side venv .venv-mxnet):
datasets written by mxnet's MXIndexedRecordIO + recordio.pack/pack_img are read by facetrain
byte for byte, and facetrain's folders_to_rec / make_longtail outputs are read by mxnet."""
from __future__ import annotations

import csv
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mxnet_side import run_mxnet  # noqa: E402

from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset

MAGIC = struct.pack("<I", rio.MAGIC)

# Reads every record of the listed .rec files with mxnet: by key (MXIndexedRecordIO) and in file
# order (MXRecordIO), unpacked with recordio.unpack; image records decoded with unpack_img into
# <rec>.mx.npz. Result R[rec] = {"keys", "sequential", "records": {key: header + payload hex}}.
DUMP = """
import numpy as np
from mxnet import recordio
R = {}
for rec in P["dump"]:
    r = recordio.MXIndexedRecordIO(rec[:-4] + ".idx", rec, "r")
    records, arrays = {}, {}
    for k in r.keys:
        s = r.read_idx(k)
        h, img = recordio.unpack(s)
        label = [float(x) for x in h.label] if h.flag > 0 else float(h.label)
        records[str(k)] = {"flag": int(h.flag), "label": label, "id": int(h.id),
                           "id2": int(h.id2), "payload": s.hex(), "image": img.hex()}
        decoded = recordio.unpack_img(s)[1] if img else None
        if decoded is not None:                    # None: not an image (raw test payloads)
            arrays[str(k)] = decoded
    r.close()
    seq, f = [], recordio.MXRecordIO(rec, "r")
    while True:
        s = f.read()
        if s is None:
            break
        seq.append(s.hex())
    f.close()
    np.savez(rec + ".mx.npz", **arrays)
    R[rec] = {"keys": [int(k) for k in r.keys], "sequential": seq, "records": records}
"""

# An InsightFace-layout dataset written the way InsightFace's tools do: key 0 header
# [first identity key, end), images 1..N (pack_img), then one [start, end) record per identity.
# Key 2 is a large raw payload with the magic word at 4-byte-aligned positions (mxnet must split
# it into continuation parts); key 3 holds it unaligned (no split); key 4 ends unpadded.
WRITE_INSIGHTFACE = """
import struct
import numpy as np
from mxnet import recordio
MAGIC = struct.pack("<I", 0xced7230a)
rng = np.random.RandomState(0)
classes = P["classes"]
n = sum(classes)
lo, hi = n + 1, n + 1 + len(classes)
w = recordio.MXIndexedRecordIO("ins.idx", "ins.rec", "w")
w.write_idx(0, recordio.pack(recordio.IRHeader(0, [float(lo), float(hi)], 0, 0), b""))
key, ranges = 1, []
for c, count in enumerate(classes):
    start = key
    for _ in range(count):
        head = recordio.IRHeader(0, float(c), key, 0)
        if key == 2:
            big = rng.bytes(200000)
            s = recordio.pack(head, b"abcd" + MAGIC + big + MAGIC + b"efgh" + MAGIC + b"xy")
        elif key == 3:
            s = recordio.pack(head, b"z" + MAGIC + b"12")
        elif key == 4:
            s = recordio.pack(head, b"IMAGE4!!")
        else:
            img = rng.randint(0, 256, (12, 10, 3)).astype(np.uint8)
            s = recordio.pack_img(head, img, quality=90, img_fmt=".jpg")
        w.write_idx(key, s)
        key += 1
    ranges.append((start, key))
for c, (a, b) in enumerate(ranges):
    w.write_idx(lo + c, recordio.pack(recordio.IRHeader(0, [float(a), float(b)], lo + c, 0), b""))
w.close()
"""

# im2rec layout (no header record): keys from the .lst (not contiguous), pack_img records with a
# scalar label, and a multi-label file (recordio.pack with a float list, as im2rec --pack-label).
WRITE_IM2REC = """
import struct
import numpy as np
from mxnet import recordio
MAGIC = struct.pack("<I", 0xced7230a)
rng = np.random.RandomState(1)
w = recordio.MXIndexedRecordIO("im2rec.idx", "im2rec.rec", "w")
for key, label in zip(P["keys"], P["labels"]):
    img = rng.randint(0, 256, (9, 11, 3)).astype(np.uint8)
    w.write_idx(key, recordio.pack_img(recordio.IRHeader(0, float(label), key, 0), img,
                                       img_fmt=".png"))
w.close()
w = recordio.MXIndexedRecordIO("multi.idx", "multi.rec", "w")
for key in range(3):
    labels = [float(key), 0.25 * key, -3.0]
    w.write_idx(key, recordio.pack(recordio.IRHeader(0, labels, key, 7),
                                   MAGIC + rng.bytes(1001) + MAGIC))
w.close()
"""


def _frames(rec: Path, offset: int):
    """Continuation flags of the frame parts of the record at `offset` (checked by hand)."""
    data = rec.read_bytes()
    flags = []
    while True:
        magic, lrec = struct.unpack_from("<II", data, offset)
        assert magic == rio.MAGIC
        flags.append(lrec >> 29)
        offset += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
        if flags[-1] in (0, 3):
            return flags


def _check_bytes_and_headers(rec: Path, mx: dict) -> rio.IndexedRecordReader:
    """facetrain's reader gives mxnet's keys, payload bytes and unpacked headers exactly."""
    reader = rio.IndexedRecordReader(rec)
    assert reader.keys.tolist() == mx["keys"]
    assert [p.hex() for _, p in reader.scan()] == mx["sequential"]
    for key, want in mx["records"].items():
        payload = reader.read_idx(int(key))
        assert payload.hex() == want["payload"], key
        h, img = rio.unpack_record(payload)
        label = [float(x) for x in h.label] if h.flag > 0 else float(h.label)
        assert (h.flag, label, h.id, h.id2, img.hex()) == \
            (want["flag"], want["label"], want["id"], want["id2"], want["image"]), key
    return reader


def _rewrite_matches(tmp_path: Path, rec: Path, mx: dict) -> None:
    """facetrain's writer, given mxnet's payloads, writes the same .rec and .idx bytes."""
    out = tmp_path / f"ours_{rec.name}"
    with rio.IndexedRecordWriter(out) as w:
        for key in mx["keys"]:
            w.write(key, bytes.fromhex(mx["records"][str(key)]["payload"]))
    assert out.read_bytes() == rec.read_bytes()
    assert out.with_suffix(".idx").read_text() == rec.with_suffix(".idx").read_text()


def test_mxnet_insightface_layout_reads_byte_for_byte(tmp_path):
    classes = [3, 1, 2]
    mx = run_mxnet(WRITE_INSIGHTFACE + DUMP, tmp_path, classes=classes,
                   dump=["ins.rec"])["ins.rec"]
    rec = tmp_path / "ins.rec"
    reader = _check_bytes_and_headers(rec, mx)
    off = dict(zip(reader.keys.tolist(), reader.offsets.tolist()))
    assert _frames(rec, off[2]) == [1, 2, 2, 3]    # mxnet split it at the 3 aligned magics
    assert len(bytes.fromhex(mx["records"]["2"]["payload"])) > 200000
    assert _frames(rec, off[3]) == [0] and _frames(rec, off[4]) == [0]
    reader.close()
    _rewrite_matches(tmp_path, rec, mx)

    ds = RecordDataset.open(str(rec))
    n = sum(classes)
    assert ds.layout == "insightface" and ds.num_classes == 3
    assert ds.keys.tolist() == list(range(1, n + 1))
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.class_counts.tolist() == classes
    decoded = np.load(str(rec) + ".mx.npz")
    assert sorted(decoded.files) == ["1", "5", "6"]        # the pack_img JPEGs
    for i in range(n):
        label, img = ds.read(i)
        key = str(int(ds.keys[i]))
        assert label == mx["records"][key]["label"] and img.hex() == mx["records"][key]["image"]
        if key in decoded.files:                       # a real JPEG: mxnet decoded it too
            import cv2
            ours = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(ours, decoded[key])
    ds.close()


def test_mxnet_im2rec_layouts_read_byte_for_byte(tmp_path):
    keys, labels = [10, 11, 13, 20, 21], [1, 0, 1, 2, 0]
    mx = run_mxnet(WRITE_IM2REC + DUMP, tmp_path, keys=keys, labels=labels,
                   dump=["im2rec.rec", "multi.rec"])
    for name in ("im2rec.rec", "multi.rec"):
        _check_bytes_and_headers(tmp_path / name, mx[name]).close()
        _rewrite_matches(tmp_path, tmp_path / name, mx[name])
    multi = rio.IndexedRecordReader(tmp_path / "multi.rec")
    assert _frames(tmp_path / "multi.rec", int(multi.offsets[0]))[0] == 1   # split at the magic
    multi.close()

    ds = RecordDataset.open(str(tmp_path / "im2rec.rec"))
    assert ds.layout == "im2rec" and ds.keys.tolist() == keys
    assert ds.labels.tolist() == labels and ds.class_counts.tolist() == [2, 2, 1]
    decoded = np.load(str(tmp_path / "im2rec.rec.mx.npz"))
    import cv2
    for i, key in enumerate(keys):
        _, img = ds.read(i)
        ours = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(ours, decoded[str(key)])
    ds.close()


@pytest.fixture(scope="module")
def facetrain_outputs(tmp_path_factory):
    """A folders_to_rec dataset from PNG folders and a make_longtail subset of it, each read by
    mxnet once. -> (tmp dir, source arrays per class, mxnet's dump of both)."""
    import cv2
    from facetrain.build.folders import folders_to_rec
    from facetrain.build.longtail import make_longtail

    tmp = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    arrays = {}
    for c, count in enumerate([4, 3, 2]):
        d = tmp / "faces" / f"person_{c}"
        d.mkdir(parents=True)
        arrays[c] = []
        for j in range(count):
            img = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
            cv2.imwrite(str(d / f"{j:02d}.png"), img)
            arrays[c].append(img)
    folders_to_rec(str(tmp / "faces"), str(tmp / "packed" / "train"))
    make_longtail(str(tmp / "packed"), str(tmp / "lt"), head=1, tail=None, tail_samples=2)
    mx = run_mxnet(DUMP, tmp, dump=["packed/train.rec", "lt/train.rec"])
    return tmp, arrays, mx


def _check_insightface_read_by_mxnet(mx: dict, n_images: int, n_classes: int):
    """Header, identity records and image ids as mxnet reads them -> label per image key."""
    recs = mx["records"]
    lo, hi = n_images + 1, n_images + 1 + n_classes
    assert recs["0"]["flag"] == 2 and recs["0"]["label"] == [lo, hi] and recs["0"]["image"] == ""
    assert mx["keys"] == list(range(hi))
    label_of, expect_start = {}, 1
    for c in range(n_classes):
        r = recs[str(lo + c)]
        a, b = r["label"]
        assert r["flag"] == 2 and r["id"] == lo + c and r["image"] == ""
        assert a == expect_start and b > a
        for k in range(int(a), int(b)):
            label_of[k] = c
        expect_start = b
    assert expect_start == lo
    for k in range(1, lo):
        assert recs[str(k)]["flag"] == 0 and recs[str(k)]["id"] == k
        assert recs[str(k)]["label"] == label_of[k]
    return label_of


def test_mxnet_reads_folders_to_rec_output(facetrain_outputs):
    tmp, arrays, mx = facetrain_outputs
    mx = mx["packed/train.rec"]
    label_of = _check_insightface_read_by_mxnet(mx, 9, 3)
    decoded = np.load(tmp / "packed/train.rec.mx.npz")
    files = sorted((tmp / "faces").rglob("*.png"))
    for k in range(1, 10):
        c = label_of[k]
        j = k - 1 - sum(len(arrays[i]) for i in range(c))
        np.testing.assert_array_equal(decoded[str(k)], arrays[c][j])
        assert mx["records"][str(k)]["image"] == files[k - 1].read_bytes().hex()   # copied as is
    assert (tmp / "packed/property").read_text().strip() == "3,14,12"


def test_mxnet_reads_make_longtail_output(facetrain_outputs):
    tmp, arrays, mx = facetrain_outputs
    mx = mx["lt/train.rec"]
    with open(tmp / "lt/manifest.csv", newline="") as fh:
        source = {int(r["new_label"]): int(r["source_label"]) for r in csv.DictReader(fh)}
    assert source == {0: 0, 1: 1, 2: 2}
    label_of = _check_insightface_read_by_mxnet(mx, 4 + 2 + 2, 3)
    decoded = np.load(tmp / "lt/train.rec.mx.npz")
    seen = {c: [] for c in source}
    for k, c in label_of.items():
        img = decoded[str(k)]
        hits = [j for j, a in enumerate(arrays[source[c]]) if np.array_equal(a, img)]
        assert len(hits) == 1, f"key {k}: not an image of source class {source[c]}"
        seen[c].append(hits[0])
    assert sorted(seen[0]) == [0, 1, 2, 3]               # the head keeps every image
    assert all(len(set(seen[c])) == 2 for c in (1, 2))   # tail classes keep 2 distinct images
    assert (tmp / "lt/property").read_text().strip() == "3,14,12"
