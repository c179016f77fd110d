"""make_pack: LFW pairs.txt and CSV pairs -> .bin read back by the evaluator's load_pack and by a
reader written here from the format (a pickle of (bins, issame_list), no class references), pair
and fold order kept; refusals name the file and line."""
import io
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.eval.verification import evaluate_pack_features, load_pack
from test_data_tools import tool

PEOPLE = ["Ann_Lee", "Bo_Chan", "Cy_Dove", "Di_Egan"]


def make_lfw(root: Path, size: int = 24) -> None:
    """Person p's image n: colour (40p + 3n, 200 - 40p, 90), a white corner: unique per file."""
    for p, name in enumerate(PEOPLE):
        for n in (1, 2, 3):
            img = np.full((size, size, 3), (40 * p + 3 * n, 200 - 40 * p, 90), np.uint8)
            img[:4, :4] = 255
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{name}_{n:04d}.jpg"), img)


def lfw_pairs(folds: int = 10) -> str:
    """Header `folds 1`, then per fold one same pair and one different pair (LFW's order)."""
    lines = [f"{folds}\t1"]
    for k in range(folds):
        a, b = PEOPLE[k % 4], PEOPLE[(k + 1) % 4]
        lines += [f"{a}\t{1 + k % 2}\t3", f"{a}\t{1 + k % 3}\t{b}\t{1 + (k + 1) % 3}"]
    return "\n".join(lines) + "\n"


def read_pack_from_definition(path: Path):
    """A pack as the format defines it: pickle of (list of encoded images, list of bools); a
    pack that needs any class to unpickle is refused here."""
    class NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise AssertionError(f"pack references {module}.{name}")

    bins, issame = NoGlobals(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    assert isinstance(bins, list) and isinstance(issame, list)
    assert all(type(b) is bytes for b in bins) and all(type(s) is bool for s in issame)
    return bins, issame


def test_lfw_pairs_round_trip(tmp_path, capsys):
    make_lfw(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(lfw_pairs())
    before = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    out = tmp_path / "packs" / "lfw.bin"
    assert tool("make_pack")([str(tmp_path / "lfw"), str(tmp_path / "pairs.txt"), "--output",
                              str(out), "--no-progress"]) == 0
    assert "20 pairs (10 same, 10 different), 12 distinct images of 24x24" in \
        capsys.readouterr().out
    # Expected, from the pairs file's lines in order (fold k = lines 2+2k, 3+2k).
    def lfw_file(name, num):
        return f"{name}/{name}_{int(num):04d}.jpg"

    want_paths, want_same = [], []
    for line in lfw_pairs().splitlines()[1:]:
        f = line.split("\t")
        if len(f) == 3:
            want_paths += [lfw_file(f[0], f[1]), lfw_file(f[0], f[2])]
        else:
            want_paths += [lfw_file(f[0], f[1]), lfw_file(f[2], f[3])]
        want_same.append(len(f) == 3)
    want_bins = [(tmp_path / "lfw" / p).read_bytes() for p in want_paths]
    bins, issame = read_pack_from_definition(out)
    assert bins == want_bins and issame == want_same == [True, False] * 10
    ours_bins, ours_same = load_pack(out)
    assert ours_bins == want_bins and ours_same.tolist() == want_same
    # The evaluator scores it; features = mean colour, so same-person pairs score highest.
    feats = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
                      .reshape(-1, 3).mean(0) - 128 for b in ours_bins])
    res = evaluate_pack_features(feats, ours_same)
    assert res["pairs"] == 20 and len(res["fold_accuracy"]) == 10
    after = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file() and p != out)
    assert after == before                                         # inputs untouched
    assert sorted(x.name for x in out.parent.iterdir()) == ["lfw.bin"]   # no temporary left


def test_csv_pairs_and_header(tmp_path):
    make_lfw(tmp_path / "imgs")
    rows = ["path1,path2,same"]
    for k in range(10):
        a, b = PEOPLE[k % 4], PEOPLE[(k + 2) % 4]
        rows += [f"{a}/{a}_0001.jpg,{a}/{a}_0002.jpg,{['1', 'true'][k % 2]}",
                 f"{a}/{a}_0003.jpg,{b}/{b}_0001.jpg,{['0', 'False'][k % 2]}"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "mine.bin"
    assert tool("make_pack")([str(tmp_path / "imgs"), str(tmp_path / "pairs.csv"), "--output",
                              str(out), "--no-progress"]) == 0
    bins, issame = read_pack_from_definition(out)
    assert issame == [True, False] * 10
    want = [(tmp_path / "imgs" / p).read_bytes() for r in rows[1:] for p in r.split(",")[:2]]
    assert bins == want


@pytest.mark.parametrize("case", ["bad_line", "bad_number", "missing", "unbalanced", "header",
                                  "one_sided", "csv_bad", "undecodable", "sizes", "exists"])
def test_refusals(tmp_path, capsys, case):
    make_lfw(tmp_path / "lfw")
    text = lfw_pairs()
    fmt = "pairs.txt"
    args = []
    also = ""
    lines = text.splitlines()
    if case == "bad_line":
        lines[5] = "Ann_Lee\t1"
        msg = f"{tmp_path / 'pairs.txt'}, line 6: expected `name n1 n2`"
    elif case == "bad_number":
        lines[3] = "Ann_Lee\tone\t2"
        msg = f"{tmp_path / 'pairs.txt'}, line 4: image number 'one' is not an integer"
    elif case == "missing":
        lines[7] = "Ann_Lee\t1\t9"
        msg = f"1 pair image(s) do not exist (line 8: {tmp_path / 'lfw/Ann_Lee/Ann_Lee_0009.jpg'})"
    elif case == "unbalanced":
        lines = ["Ann_Lee\t1\t2"] * 11 + ["Ann_Lee\t1\tBo_Chan\t2"] * 10
        msg = "21 pairs do not split into 10 equal folds"
        also = "add or remove pairs (or pass another --folds)"      # the library's `n_folds`
    elif case == "header":
        lines = lines[:-2]
        msg = "the header announces 20 pairs but the file has 18"
    elif case == "one_sided":
        lines = ["Ann_Lee\t1\t2"] * 10 + ["Ann_Lee\t1\tBo_Chan\t2"] * 10
        msg = "fold 1 of 10 (lines 1-2) holds only same pairs"
    elif case == "csv_bad":
        fmt = "pairs.csv"
        lines = ["path1,path2,same", "Ann_Lee/Ann_Lee_0001.jpg,Ann_Lee/Ann_Lee_0002.jpg,maybe"]
        msg = f"{tmp_path / 'pairs.csv'}, line 2: same must be 1/0"
    elif case == "undecodable":
        (tmp_path / "lfw/Bo_Chan/Bo_Chan_0002.jpg").write_bytes(b"not a jpeg")
        msg = f"{tmp_path / 'lfw/Bo_Chan/Bo_Chan_0002.jpg'} (pairs file line"
    elif case == "sizes":
        cv2.imwrite(str(tmp_path / "lfw/Bo_Chan/Bo_Chan_0002.jpg"), np.zeros((30, 24, 3)))
        msg = f"{tmp_path / 'lfw/Bo_Chan/Bo_Chan_0002.jpg'} is 30x24 but"
    elif case == "exists":
        (tmp_path / "out.bin").write_bytes(b"old")
        msg = f"{tmp_path / 'out.bin'} already exists; pass --overwrite"
    (tmp_path / fmt).write_text("\n".join(lines) + "\n")
    assert tool("make_pack")([str(tmp_path / "lfw"), str(tmp_path / fmt), "--output",
                              str(tmp_path / "out.bin"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and also in err
    if case == "exists":
        assert (tmp_path / "out.bin").read_bytes() == b"old"
    else:
        assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        tool("make_pack")(["--help"])
    assert "make_pack.py lfw_aligned/ pairs.txt --output data/packs/lfw.bin" in \
        capsys.readouterr().out
