"""merge_rec: relabelling without collisions (first input first), identity records and header
checked by a RecordIO parser written here from the format, bytes copied unchanged, manifest,
inputs untouched, every refusal with its message; make_longtail and training read the result."""
import csv
import hashlib
import struct
import sys
from pathlib import Path

import pytest

from facetrain.build.longtail import make_longtail
from facetrain.build.merge import merge_datasets
from facetrain.data.dataset import RecordDataset
from test_dataset import image_bytes, make_dataset, make_im2rec
from test_data_tools import tool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from test_train_data import make_tiny_rec, tiny_config  # noqa: E402

MAGIC = 0xCED7230A


def parse_rec(rec: Path) -> dict:
    """{key: (flag, labels, id, image bytes)} read from the raw file, from the format's definition:
    frames `magic, lrec` (cflag = lrec >> 29, 29-bit length, 4-byte padding; a cflag 1/2 part is
    followed by a removed magic word), payload = `IfQQ` header, `flag` float32 labels, image."""
    data, pos, out = rec.read_bytes(), 0, {}
    idx = {int(a): int(b) for a, b in (ln.split("\t") for ln in
                                       rec.with_suffix(".idx").read_text().splitlines())}
    starts = {}
    while pos < len(data):
        start, parts = pos, []
        while True:
            magic, lrec = struct.unpack_from("<II", data, pos)
            assert magic == MAGIC, f"no magic at {pos}"
            n, cflag = lrec & ((1 << 29) - 1), lrec >> 29
            parts.append(data[pos + 8:pos + 8 + n])
            pos += 8 + (n + 3) // 4 * 4
            if cflag in (0, 3):
                break
            parts.append(struct.pack("<I", MAGIC))
        payload = b"".join(parts)
        flag, label, rid, _ = struct.unpack_from("<IfQQ", payload, 0)
        labels = list(struct.unpack_from(f"<{flag}f", payload, 24)) if flag else [label]
        out[rid] = (flag, labels, payload[24 + 4 * flag:])
        starts[rid] = start
    assert idx == starts                                   # the .idx points at each record
    return out


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_merge_relabels_and_copies_bytes(tmp_path):
    a_prefix, a_items = make_dataset(tmp_path / "a", [3, 1, 2])
    make_im2rec(tmp_path / "b" / "train.rec", [1, 0, 1, 1])      # im2rec layout, labels unsorted
    before = {d: _digest(tmp_path / d) for d in ("a", "b")}
    s = merge_datasets([a_prefix, str(tmp_path / "b")], str(tmp_path / "m"))
    assert (s.classes, s.images, s.image_shape) == (5, 10, (16, 16))
    recs = parse_rec(tmp_path / "m" / "train.rec")
    # Header: key 0, flag 2, [first identity key, end); images 1..10; identity 11..15.
    assert recs[0] == (2, [11.0, 16.0], b"")
    # Expected from the inputs: A's classes 0-2 in order, then B's class 0 -> 3, class 1 -> 4
    # (B's images grouped by class, dataset order inside).
    b_labels = [1, 0, 1, 1]
    want = [(lab, img) for lab, img in a_items]
    want += [(3 + lab, image_bytes(lab, k)) for lab in (0, 1) for k, x in enumerate(b_labels)
             if x == lab]
    for key, (lab, img) in enumerate(want, start=1):
        assert recs[key] == (0, [float(lab)], img), key
    ranges = [recs[11 + c][1] for c in range(5)]
    assert ranges == [[1, 4], [4, 5], [5, 7], [7, 8], [8, 11]]
    assert all(recs[11 + c][0] == 2 and recs[11 + c][2] == b"" for c in range(5))
    assert (tmp_path / "m" / "property").read_text() == "5,16,16\n"
    with open(tmp_path / "m" / "manifest.csv", newline="") as fh:
        rows = [(int(r["new_label"]), int(r["input"]), r["source"], int(r["source_label"]),
                 int(r["images"])) for r in csv.DictReader(fh)]
    b = str(tmp_path / "b")
    assert rows == [(0, 0, a_prefix, 0, 3), (1, 0, a_prefix, 1, 1), (2, 0, a_prefix, 2, 2),
                    (3, 1, b, 0, 1), (4, 1, b, 1, 3)]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == \
        ["manifest.csv", "property", "train.idx", "train.rec"]       # no temporary left
    # The inputs' data files are unchanged (B gets the same label cache training would write).
    assert _digest(tmp_path / "a") == before["a"]
    after_b = _digest(tmp_path / "b")
    assert {k: after_b[k] for k in before["b"]} == before["b"]
    # make_longtail takes the merged dataset as input.
    make_longtail(str(tmp_path / "m"), str(tmp_path / "lt"), head=1, tail=None, tail_samples=2)
    lt = RecordDataset.open(str(tmp_path / "lt"))
    assert lt.class_counts.tolist() == [3, 2, 2]          # head B:1 (3 images), tails A:0, A:2


def test_merge_refusals(tmp_path, capsys):
    a, _ = make_dataset(tmp_path / "a", [2, 2])
    b, _ = make_dataset(tmp_path / "b", [1, 2], size=12)
    c, _ = make_dataset(tmp_path / "c", [1])
    main = tool("merge_rec")
    assert main([a, c, "--output", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"output folder {tmp_path / 'a'} is the input dataset's folder" in err
    assert "may not be one of the merged inputs" in err
    assert main([a, b, "--output", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"different image sizes ({a}: 16x16, {b}: 12x12)" in err and \
        "--allow-mixed-sizes" in err
    assert not (tmp_path / "m").exists()
    assert main([a, str(tmp_path / "a"), "--output", str(tmp_path / "m")]) == 2
    assert f"{tmp_path / 'a'}: the same dataset as {a}" in capsys.readouterr().err
    assert main([a, "--output", str(tmp_path / "m")]) == 2
    assert "at least two datasets" in capsys.readouterr().err
    assert main([a, str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert main([a, b, c, "--output", str(tmp_path / "m"), "--allow-mixed-sizes",
                 "--shard-size", "3", "--no-progress"]) == 0
    assert "= 5 classes, 8 images, 16x16" in capsys.readouterr().out
    ds = RecordDataset.open(str(tmp_path / "m"))
    assert len(ds.shards) == 3 and ds.class_counts.tolist() == [2, 2, 1, 2, 1]
    assert main([a, c, "--output", str(tmp_path / "m")]) == 2       # non-empty: --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        tool("merge_rec")(["--help"])
    assert "merge_rec.py data/mine/train /data/ms1mv3/train --output" in capsys.readouterr().out


def test_training_reads_a_merged_dataset(tmp_path):
    from facetrain.dist import single_process
    from facetrain.trainer import Trainer

    a = make_tiny_rec(tmp_path / "a", counts=(8, 8, 4), seed=0)
    b = make_tiny_rec(tmp_path / "b", counts=(6, 4), seed=1)
    merge_datasets([a, b], str(tmp_path / "m"))
    cfg = tiny_config(str(tmp_path / "m" / "train"), tmp_path / "run",
                      ["leap.head_threshold=5", "train.epochs=1"])
    t = Trainer(cfg, single_process())
    t.fit(stop_after=3)
    assert list(t.loader.class_counts) == [8, 8, 4, 6, 4]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_sigterm_mid_merge_leaves_nothing(tmp_path):
    import signal

    from test_data_tools_faults import _one_message, hidden, run_and_terminate, snapshot

    a, _ = make_dataset(tmp_path / "a", [3, 2])
    b, _ = make_dataset(tmp_path / "b", [2])
    before = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    res = run_and_terminate(["merge_rec", a, b, "--output", str(tmp_path / "m"),
                             "--no-progress"])
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    msg = _one_message(res.stderr, "merge_rec")
    assert "stopped by SIGTERM while writing" in msg and "temporary files were removed" in msg
    assert not (tmp_path / "m").exists() and not hidden(tmp_path)
    assert (snapshot(tmp_path / "a"), snapshot(tmp_path / "b")) == before
