"""Long-tail subset semantics on a tiny dataset: ranking, ties, head/tail, seeded picks, bytes."""
import csv
import numpy as np
import pytest

from facetrain.build.longtail import make_longtail, rank_classes, select_classes
from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset
from test_dataset import make_dataset, make_im2rec

COUNTS = [3, 8, 5, 8, 2, 6, 4, 1]     # classes 1 and 3 tie at 8


def test_rank_and_select():
    counts = np.array(COUNTS)
    assert rank_classes(counts).tolist() == [1, 3, 5, 2, 6, 0, 4, 7]
    head, tail = select_classes(counts, head=2, tail=None, tail_samples=4)
    assert head.tolist() == [1, 3] and tail.tolist() == [5, 2, 6]      # 0, 4, 7 have < 4
    head, tail = select_classes(counts, head=3, tail=2, tail_samples=2)
    assert head.tolist() == [1, 3, 5] and tail.tolist() == [2, 6]
    with pytest.raises(ValueError, match=r"`head` must be in \[0, 8\]"):
        select_classes(counts, 9, None, 5)


def test_make_longtail_subset(tmp_path):
    prefix, items = make_dataset(tmp_path / "src", COUNTS)
    by_class = {}
    for lab, img in items:
        by_class.setdefault(lab, []).append(img)
    s = make_longtail(prefix, str(tmp_path / "out"), head=2, tail=None, tail_samples=4, seed=3)
    assert (s.head_classes, s.tail_classes, s.head_images, s.tail_images) == (2, 3, 16, 12)
    ds = RecordDataset.open(str(tmp_path / "out"))
    assert ds.class_counts.tolist() == [8, 8, 4, 4, 4] and ds.image_shape == (16, 16)
    got = {}
    for i in range(len(ds)):
        lab, img = ds.read(i)
        got.setdefault(lab, []).append(img)
    source = [1, 3, 5, 2, 6]
    assert got[0] == by_class[1] and got[1] == by_class[3]           # head: all, in order
    for new, src in enumerate(source[2:], start=2):                    # tail: S of the class
        assert len(set(got[new])) == 4 and set(got[new]) <= set(by_class[src])
    with open(tmp_path / "out" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["source_label"]) for r in rows] == source
    assert [r["part"] for r in rows] == ["head"] * 2 + ["tail"] * 3
    # Seeded: same seed -> same picks; another seed -> (here) different picks.
    make_longtail(prefix, str(tmp_path / "same"), 2, None, 4, seed=3)
    assert (tmp_path / "same" / "train.rec").read_bytes() == \
        (tmp_path / "out" / "train.rec").read_bytes()
    make_longtail(prefix, str(tmp_path / "other"), 2, None, 4, seed=4)
    assert (tmp_path / "other" / "train.rec").read_bytes() != \
        (tmp_path / "out" / "train.rec").read_bytes()


def test_longtail_from_im2rec_shards_to_shards(tmp_path):
    labels = [0, 1, 1, 2, 2, 2, 1, 2]
    make_im2rec(tmp_path / "src" / "train_000.rec", labels[:5])
    make_im2rec(tmp_path / "src" / "train_001.rec", labels[5:], start_key=5)
    s = make_longtail(str(tmp_path / "src"), str(tmp_path / "out"), head=1, tail=1,
                      tail_samples=2, seed=0, shard_size=3)
    assert (s.head_classes, s.tail_classes) == (1, 1)
    ds = RecordDataset.open(str(tmp_path / "out"))
    assert len(ds.shards) == 2 and ds.class_counts.tolist() == [4, 2]
    src = RecordDataset.open(str(tmp_path / "src"))
    src_imgs = {src.read(i)[1]: src.labels[i] for i in range(len(src))}
    for i in range(len(ds)):
        lab, img = ds.read(i)
        assert src_imgs[img] == [2, 1][lab]                           # bytes copied unchanged
    h, _ = rio.unpack_record(ds.read_raw(0))
    assert h.id == 1 and h.label == 0.0


def test_tail_exclude_keeps_excluded_images_out_of_the_tail(tmp_path):
    prefix, items = make_dataset(tmp_path / "src", COUNTS)
    by_class = {}
    for lab, img in items:
        by_class.setdefault(lab, []).append(img)
    # Class 5 (6 images) may keep only ordinals 0, 1, 5; class 2 (5 images) only 0, 1: too few
    # for 3 samples, so it is not a tail class; class 1 is head and keeps everything.
    ex = tmp_path / "exclude.csv"
    ex.write_text("label,ordinal,design\n5,2,x\n5,3,x\n5,4,x\n2,2,x\n2,3,x\n2,4,x\n1,0,x\n")
    s = make_longtail(prefix, str(tmp_path / "out"), head=2, tail=None, tail_samples=3, seed=0,
                      tail_exclude=str(ex))
    with open(tmp_path / "out" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["source_label"]) for r in rows] == [1, 3, 5, 6, 0]       # 2 dropped
    ds = RecordDataset.open(str(tmp_path / "out"))
    got = {}
    for i in range(len(ds)):
        lab, img = ds.read(i)
        got.setdefault(lab, []).append(img)
    assert got[0] == by_class[1]                                           # head untouched
    assert got[2] == [by_class[5][k] for k in (0, 1, 5)]                   # only the allowed
    assert s.tail_classes == 3 and s.tail_images == 9


@pytest.mark.parametrize("text,msg", [
    ("label,design\n1,2\n", r"exclude.csv: the header must name the columns label and ordinal"),
    ("label,ordinal\n1,x\n", r"exclude.csv, line 2: label and ordinal must be integers"),
    ("label,ordinal\n4,2\n", r"exclude.csv, line 2: label 4 ordinal 2 is not an image of the "
                             r"dataset \(8 classes; that class has 2\)"),
])
def test_tail_exclude_errors_name_file_and_line(tmp_path, text, msg):
    prefix, _ = make_dataset(tmp_path / "src", COUNTS)
    ex = tmp_path / "exclude.csv"
    ex.write_text(text)
    with pytest.raises(ValueError, match=msg):
        make_longtail(prefix, str(tmp_path / "out"), 2, None, 3, tail_exclude=str(ex))
