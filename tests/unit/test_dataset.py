"""RecordDataset: InsightFace/im2rec layouts, shards as one dataset, K_i, stale/missing index and
every bad-input error (each names the file and the key or byte offset)."""
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.build.writer import write_insightface_dataset
from facetrain.data import dataset as dsmod
from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset
from facetrain.data.errors import DatasetError

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def image_bytes(label: int, i: int, size: int = 16) -> bytes:
    """A JPEG whose left half is (label, i, 40) in BGR and right half white: asymmetric, unique."""
    img = np.full((size, size, 3), 255, np.uint8)
    img[:, : size // 2] = (min(label * 20, 255), min(i * 7, 255), 40)
    return cv2.imencode(".png", img)[1].tobytes()


def make_dataset(folder: Path, counts, size: int = 16, shard_size=None, name: str = "train"):
    items = [(c, image_bytes(c, i, size)) for c, n in enumerate(counts) for i in range(n)]
    write_insightface_dataset(folder / name, items, len(counts), size, shard_size=shard_size)
    return str(folder / name), items


def make_im2rec(path: Path, labels, start_key: int = 0):
    with rio.IndexedRecordWriter(path) as w:
        for k, lab in enumerate(labels):
            w.write(start_key + k, rio.pack_irheader(float(lab), k, 0, image_bytes(lab, k)))


def test_fixture_insightface_layout():
    ds = RecordDataset.open(str(FIX / "insightface.rec"))
    assert ds.layout == "insightface" and len(ds) == 3 and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1] and ds.class_counts.tolist() == [2, 1]
    assert ds.read(0)[1].startswith(b"abcd") and ds.read(2) == (1, b"IMAGE3!!")
    assert ds.image_shape is None


def test_roundtrip_and_shards_read_as_one(tmp_path):
    counts = [5, 1, 3, 2]
    prefix, items = make_dataset(tmp_path / "one", counts)
    ds = RecordDataset.open(prefix)
    assert (ds.num_classes, ds.image_shape, len(ds)) == (4, (16, 16), 11)
    assert ds.class_counts.tolist() == counts
    assert [ds.read(i) for i in range(len(ds))] == items
    sharded, _ = make_dataset(tmp_path / "sh", counts, shard_size=4)
    assert sorted(os.listdir(tmp_path / "sh"))[:3] == ["property", "train_000.idx", "train_000.rec"]
    for path in (sharded, str(tmp_path / "sh")):
        ds2 = RecordDataset.open(path)
        assert len(ds2.shards) == 3 and ds2.class_counts.tolist() == counts
        assert [ds2.read(i) for i in range(len(ds2))] == items
    assert RecordDataset.open(str(tmp_path / "one" / "train.rec")).labels.tolist() == \
        ds.labels.tolist()


def test_im2rec_layout_scan_is_cached(tmp_path, monkeypatch):
    labels = [2, 0, 2, 1, 2]
    make_im2rec(tmp_path / "train.rec", labels)
    ds = RecordDataset.open(str(tmp_path / "train"))
    assert ds.layout == "im2rec" and ds.labels.tolist() == labels
    assert ds.class_counts.tolist() == [1, 1, 3] and ds.read(3)[0] == 1
    assert (tmp_path / "train.labels.npy").is_file()

    def no_scan(*a, **k):
        raise AssertionError("label scan repeated although cached")
    monkeypatch.setattr(dsmod, "read_label_at", no_scan)
    assert RecordDataset.open(str(tmp_path / "train")).labels.tolist() == labels


def test_independent_im2rec_shards_concatenate(tmp_path):
    make_im2rec(tmp_path / "train_000.rec", [0, 1])
    make_im2rec(tmp_path / "train_001.rec", [1, 2, 2])      # keys 0.. again
    ds = RecordDataset.open(str(tmp_path))
    assert ds.labels.tolist() == [0, 1, 1, 2, 2] and ds.shard_ids.tolist() == [0, 0, 1, 1, 1]
    assert ds.read(4)[0] == 2


def test_missing_and_stale_index_then_rebuild(tmp_path):
    prefix, items = make_dataset(tmp_path, [2, 3], shard_size=2)
    (tmp_path / "train_001.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_001\.idx is missing.*rebuild_index"):
        RecordDataset.open(prefix)
    ds = RecordDataset.open(prefix, rebuild_index=True)
    assert [ds.read(i) for i in range(len(ds))] == items
    shutil.copy(tmp_path / "train_000.idx", tmp_path / "keep.idx")
    with open(tmp_path / "train_000.rec", "ab") as fh:       # records appended after indexing
        fh.write(rio.encode_record(rio.pack_irheader(0.0, 99, 0, b"x")))
    with pytest.raises(DatasetError, match=r"train_000\.idx is stale.*rebuild_indexes\("):
        RecordDataset.open(prefix)


def test_bad_inputs_name_file_and_key(tmp_path):
    prefix, items = make_dataset(tmp_path / "a", [2, 2])
    ds = RecordDataset.open(prefix)
    off = int(ds.offsets[1])
    rec = tmp_path / "a" / "train.rec"
    orig = rec.read_bytes()
    data = bytearray(orig)
    data[off:off + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"train\.idx does not match .*train\.rec: key 2 "
                                           rf"points at byte {off}, where no record starts"):
        RecordDataset.open(prefix)                           # every offset is checked at open
    rec.write_bytes(orig[: len(orig) - 10])                  # truncated last record
    with pytest.raises(rio.TruncatedRecordError, match=r"train\.rec is truncated: the file ends "
                                                       r"at byte \d+, inside the record that "
                                                       r"starts at byte \d+"):
        RecordDataset.open(prefix)
    with pytest.raises(FileNotFoundError, match=r"nothere\.rec.*nothere_000\.rec"):
        RecordDataset.open(str(tmp_path / "nothere"))


def test_property_mismatch_and_label_out_of_range(tmp_path):
    prefix, _ = make_dataset(tmp_path / "p", [2, 2])
    (tmp_path / "p" / "property").write_text("3,16,16\n")
    with pytest.raises(DatasetError, match=r"property says 3 classes but the identity records"):
        RecordDataset.open(prefix)
    make_im2rec(tmp_path / "q" / "train.rec", [0, 4, 1])
    (tmp_path / "q" / "property").write_text("3,16,16\n")
    with pytest.raises(DatasetError, match=r"train\.rec: record key 1 has label 4, outside \[0, 3\)"):
        RecordDataset.open(str(tmp_path / "q" / "train"))
    make_im2rec(tmp_path / "r" / "train.rec", [0, 1.5])
    with pytest.raises(DatasetError, match=r"record key 1 at byte \d+: label 1.5 is not a class id"):
        RecordDataset.open(str(tmp_path / "r" / "train"))


def test_record_label_disagreeing_with_identity_records(tmp_path):
    items = [(0, b"a"), (1, b"b")]
    write_insightface_dataset(tmp_path / "train", items, 2, 8)
    rec = tmp_path / "train.rec"
    raw = rec.read_bytes()
    r = rio.IndexedRecordReader(rec)
    off = int(r.offsets[2]) + 8 + 4                            # label field of key 2
    rec.write_bytes(raw[:off] + np.float32(0.0).tobytes() + raw[off + 4:])
    with pytest.raises(DatasetError, match=r"record key 2 at byte \d+: label 0 disagrees"):
        RecordDataset.open(str(tmp_path / "train")).read(1)


def test_writer_is_atomic_on_error(tmp_path):
    def items():
        yield 0, b"a"
        yield 5, b"b"                                          # label out of range
    with pytest.raises(ValueError, match=r"item 1 has label 5, outside \[0, 2\)"):
        write_insightface_dataset(tmp_path / "train", items(), 2, 8)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="grouped by label"):
        write_insightface_dataset(tmp_path / "train", [(0, b"a"), (1, b"b"), (0, b"c")], 2, 8)
    assert os.listdir(tmp_path) == []


def test_label_cache_goes_to_user_cache_when_data_is_read_only(tmp_path, monkeypatch):
    from facetrain.data import cache

    make_im2rec(tmp_path / "ro" / "train.rec", [1, 0, 1])
    monkeypatch.setenv("FACETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)
    ds = RecordDataset.open(str(tmp_path / "ro" / "train"))
    assert ds.class_counts.tolist() == [1, 2]
    assert not (tmp_path / "ro" / "train.labels.npy").exists()
    assert len(list((tmp_path / "cache").glob("*/train.labels.npy"))) == 1


def test_label_far_beyond_the_distinct_labels_is_refused_before_allocation(tmp_path):
    """Without a property file the class count is the largest label + 1: one stray label
    300,000,000 would ask for 300M classifier rows (38 GB at 32-d fp32 ... and a 2.4 GB count
    array first). It is refused naming the record, before anything of that size exists."""
    import tracemalloc

    make_im2rec(tmp_path / "a" / "train.rec", [0, 1, 2, 300_000_000, 1])
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as info:
            RecordDataset.open(str(tmp_path / "a" / "train"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    prop = tmp_path / "a" / "property"
    assert str(info.value) == (
        f"{tmp_path / 'a' / 'train.rec'}: record key 3 has label 300000000, but the 5 images "
        "carry only 4 distinct labels: without a property file the class count is the largest "
        "label + 1, 300000001 classifier rows of which 299999997 have no image. Fix the label "
        "or number the classes 0..3; if that many classes are meant, state the class count in "
        f"{prop} as `300000001,HEIGHT,WIDTH`")
    # Following the advice: a property file stating the count is taken as meant.
    make_im2rec(tmp_path / "b" / "train.rec", [0, 1, 5000])
    with pytest.raises(DatasetError, match=r"record key 2 has label 5000, but the 3 images"):
        RecordDataset.open(str(tmp_path / "b" / "train"))
    (tmp_path / "b" / "property").write_text("5001,16,16\n")
    ds = RecordDataset.open(str(tmp_path / "b" / "train"))
    assert ds.num_classes == 5001 and ds.class_counts[[0, 1, 5000]].tolist() == [1, 1, 1]
    # A property file whose count a stray label exceeds is named before the counts exist too.
    (tmp_path / "a" / "property").write_text("3,16,16\n")
    with pytest.raises(DatasetError, match=r"record key 3 has label 300000000, outside \[0, 3\)"):
        RecordDataset.open(str(tmp_path / "a" / "train"))
    # Small gaps (up to 1000 empty rows) stay allowed, as before.
    make_im2rec(tmp_path / "c" / "train.rec", [0, 1, 900])
    assert RecordDataset.open(str(tmp_path / "c" / "train")).num_classes == 901
