"""The data tools' outputs read by the real mxnet 1.9.1: a merge_rec dataset through
MXIndexedRecordIO (header, identity records, labels, image bytes), and a make_pack .bin the way
InsightFace's verification loader reads it (pickle.load, then mx.image.imdecode per image)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mxnet_side import run_mxnet  # noqa: E402
from test_mxnet_oracle import DUMP, _check_insightface_read_by_mxnet  # noqa: E402

# InsightFace's load_bin, reduced to what it does with the file.
LOAD_BIN = """
import pickle
import numpy as np
import mxnet as mx
with open(P["pack"], "rb") as f:
    bins, issame_list = pickle.load(f, encoding="bytes")
imgs = [mx.image.imdecode(bins[i]).asnumpy() for i in range(len(issame_list) * 2)]
np.save("mx_pack.npy", np.stack(imgs))
R = {"issame": [bool(x) for x in issame_list]}
"""


def _folders(root: Path, counts, seed: int):
    rng = np.random.default_rng(seed)
    arrays = []
    for c, n in enumerate(counts):
        d = root / f"id{c}"
        d.mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
            cv2.imwrite(str(d / f"{j}.png"), img)
            arrays.append((c, img))
    return arrays


def test_mxnet_reads_merge_rec_output(tmp_path):
    from facetrain.build.folders import folders_to_rec
    from facetrain.build.merge import merge_datasets

    a = _folders(tmp_path / "fa", [2, 3], 0)
    b = _folders(tmp_path / "fb", [1, 2], 1)
    folders_to_rec(str(tmp_path / "fa"), str(tmp_path / "a" / "train"))
    folders_to_rec(str(tmp_path / "fb"), str(tmp_path / "b" / "train"))
    merge_datasets([str(tmp_path / "a" / "train"), str(tmp_path / "b" / "train")],
                   str(tmp_path / "m"))
    mx = run_mxnet(DUMP, tmp_path, dump=["m/train.rec"])["m/train.rec"]
    label_of = _check_insightface_read_by_mxnet(mx, 8, 4)
    decoded = np.load(tmp_path / "m/train.rec.mx.npz")
    want = a + [(2 + c, img) for c, img in b]          # B's classes after A's
    for k in range(1, 9):
        assert label_of[k] == want[k - 1][0]
        np.testing.assert_array_equal(decoded[str(k)], want[k - 1][1])
    with open(tmp_path / "m/manifest.csv", newline="") as fh:
        assert [(r["input"], r["source_label"]) for r in csv.DictReader(fh)] == \
            [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]


def test_insightface_loader_reads_make_pack_output(tmp_path):
    from facetrain.build.packs import make_pack

    rng = np.random.default_rng(0)
    rows = []
    for k in range(10):
        for j in range(3):
            d = tmp_path / "img" / f"p{k}"
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{j}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        rows += [f"p{k}/0.png,p{k}/1.png,1", f"p{k}/2.png,p{(k + 1) % 10}/0.png,0"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    make_pack(tmp_path / "img", tmp_path / "pairs.csv", tmp_path / "mine.bin")
    r = run_mxnet(LOAD_BIN, tmp_path, pack="mine.bin")
    assert r["issame"] == [True, False] * 10
    imgs = np.load(tmp_path / "mx_pack.npy")                    # RGB, as mxnet decodes
    want = [cv2.imread(str(tmp_path / "img" / p))[:, :, ::-1] for row in rows
            for p in row.split(",")[:2]]
    np.testing.assert_array_equal(imgs, np.stack(want))
