"""data_tools CLIs, run in-process: make_longtail defaults and messages, folders_to_rec (identity
folders and Market-1501 names), inspect_rec, rebuild_index."""
import csv
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np

from facetrain.data.dataset import RecordDataset
from test_dataset import make_dataset

TOOLS = Path(__file__).resolve().parents[2] / "data_tools"


def tool(name):
    """A data_tools program's main, loaded as the command line runs it (its folder first on the
    path, where it finds its sibling _cli.py)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_make_longtail_defaults_and_missing_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tool("make_longtail")(["--head", "2", "--input", "nowhere/train"]) == 2
    assert "nowhere/train" in capsys.readouterr().err
    # The default input is built on first use; with no fonts that fails and says why.
    (tmp_path / "nofonts").mkdir()
    monkeypatch.setenv("FACETRAIN_GLYPH_FONT_ROOTS", str(tmp_path / "nofonts"))
    assert tool("make_longtail")(["--head", "2", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "data/glyphs_large is missing: building it once" in out
    assert "cannot build the default input data/glyphs_large" in err and "--input" in err
    assert not (tmp_path / "data" / "glyphs_large.partial").exists()
    make_dataset(tmp_path / "data" / "glyphs_large", [9, 7, 6, 5, 2])
    (tmp_path / "data" / "glyphs_large" / "manifest.json").write_text("{}")
    assert tool("make_longtail")(["--head", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 head classes (16 images) + 2 tail classes (10 images)" in out
    ds = RecordDataset.open("data/longtail_H2_Tall_S5")
    assert ds.class_counts.tolist() == [9, 7, 5, 5]
    assert tool("make_longtail")(["--head", "1", "--tail", "1", "--tail-samples", "3",
                                  "--output", "x", "--shard-size", "4", "--no-progress"]) == 0
    assert RecordDataset.open("x").class_counts.tolist() == [9, 3]


def _write_img(path: Path, value: int, shape=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape + (3,), value, np.uint8))


def test_folders_to_rec_both_layouts(tmp_path, capsys):
    for who, n in (("bob", 2), ("alice", 3)):
        for i in range(n):
            _write_img(tmp_path / "faces" / who / f"{i}.jpg", 30 * i)
    main = tool("folders_to_rec")
    assert main([str(tmp_path / "faces"), str(tmp_path / "f" / "train"), "--size", "16",
                 "--no-progress"]) == 0
    ds = RecordDataset.open(str(tmp_path / "f" / "train"))
    assert ds.class_counts.tolist() == [3, 2] and ds.image_shape == (16, 16)
    with open(tmp_path / "f" / "labels.csv") as fh:
        assert [r["identity"] for r in csv.DictReader(fh)] == ["alice", "bob"]
    for name in ("0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c1s1_000001_01.jpg",
                 "-1_c1s1_000002_01.jpg"):
        _write_img(tmp_path / "market" / name, 100)
    assert main([str(tmp_path / "market"), str(tmp_path / "m" / "train"), "--no-progress"]) == 0
    assert "1 junk files with id < 0 left out" in capsys.readouterr().out
    ds = RecordDataset.open(str(tmp_path / "m" / "train"))
    assert ds.class_counts.tolist() == [2, 1] and ds.image_shape == (20, 10)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0001_c1.jpg").write_bytes(b"nope")
    assert main([str(tmp_path / "bad"), str(tmp_path / "b" / "train"), "--no-progress"]) == 2
    assert "0001_c1.jpg: cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "b" / "train.rec").exists()


def test_inspect_and_rebuild_index(tmp_path, capsys):
    prefix, _ = make_dataset(tmp_path, [4, 1, 2])
    assert tool("inspect_rec")([prefix, "--check-decode"]) == 0
    out = capsys.readouterr().out
    assert "layout        insightface" in out and "classes       3" in out
    assert "images        7" in out and "undecodable   0" in out
    (tmp_path / "train.idx").unlink()
    assert tool("inspect_rec")([prefix]) == 2
    assert "train.idx is missing" in capsys.readouterr().err
    assert tool("rebuild_index")([prefix]) == 0
    assert "rebuilt 1 index file(s)" in capsys.readouterr().out
    assert RecordDataset.open(prefix).class_counts.tolist() == [4, 1, 2]
    assert tool("rebuild_index")([prefix]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_make_longtail_owns_the_layout_and_names_its_flags(tmp_path, capsys):
    """The repository paths are the CLI's (the library has none); library errors that name a
    parameter come out naming the flag."""
    spec = importlib.util.spec_from_file_location("_tool_ml", TOOLS / "make_longtail.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.default_output(3000, 10000, 5) == "data/longtail_H3000_T10000_S5"
    assert mod.default_output(20, None, 5) == "data/longtail_H20_Tall_S5"
    assert mod.DEFAULT_INPUT == "data/glyphs_large/train"
    prefix, _ = make_dataset(tmp_path / "d", [3, 2, 2])
    assert mod.main(["--input", prefix, "--head", "9", "--output", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "make_longtail: --head must be in [0, 3] (the dataset's class count); got 9" in err


def test_library_advice_becomes_commands_and_flags():
    """data_tools/_cli.py rewrites the library's calls and setting names, nothing else."""
    import argparse
    tool("inspect_rec")                        # puts data_tools/ on the path
    from _cli import for_command_line
    from facetrain.data.recordio import rebuild_advice
    msg = f"x.idx is stale; {rebuild_advice('/d/my data/train.rec')}"
    assert for_command_line(msg) == ("x.idx is stale; rebuild it with `python "
                                     "data_tools/rebuild_index.py '/d/my data/train.rec'` or set "
                                     "data.rebuild_index=true")
    assert for_command_line("resize them, e.g. facetrain.build.align_folder.align_folder") == \
        "resize them, e.g. `python data_tools/align_faces.py`"
    p = argparse.ArgumentParser()
    p.add_argument("--tail-samples", type=int)
    assert for_command_line("`tail_samples` must be >= 1, `head` too", p) == \
        "--tail-samples must be >= 1, `head` too"
    # parameters with a value: a switch alone, a value after its option (shell-quoted), and
    # names the parser does not have left as the library wrote them
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--folds", dest="n_folds", type=int)
    from _cli import add_align_options
    add_align_options(p)
    assert for_command_line("pass `skip_bad=True`; 2 faces (`multiple='skip'`); `n_folds`; "
                            "`multiple='a b'`; `n_folds=5`; `overwrite=True`", p) == \
        ("pass --skip-bad; 2 faces (--multiple skip); --folds; --multiple 'a b'; --folds 5; "
         "`overwrite=True`")
    assert for_command_line("resize them (facetrain.build.folders.folders_to_rec(size=...))") \
        == "resize them (`python data_tools/folders_to_rec.py --size`)"


def test_align_summary_reasons_read_as_flags(tmp_path, capsys):
    """A reason in the alignment report names the library's parameter; the aligning programs
    print it as their flag (`multiple='skip'` -> --multiple skip)."""
    import argparse
    import pytest
    from facetrain.build.align_folder import SEVERAL, Aligner, AlignFailure
    from facetrain.build.landmarks import Face
    tool("align_faces")
    from _cli import add_align_options, print_align_summary
    two = [Face((0, 0, 4, 4), 1.0, np.zeros((5, 2))), Face((0, 0, 6, 6), 1.0, np.zeros((5, 2)))]
    detector = type("Two", (), {"detect": lambda self, img: two})()
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(AlignFailure) as exc:
        Aligner(None, detector, "skip")(png.tobytes(), "two.png")
    assert (exc.value.status, exc.value.why) == (SEVERAL, "2 faces (`multiple='skip'`)")
    from facetrain.build.align_folder import AlignSummary
    p = argparse.ArgumentParser()
    add_align_options(p)
    print_align_summary("align_faces", AlignSummary({SEVERAL: 1}, 0, "r.csv", "out",
                                                    [("two.png", SEVERAL, exc.value.why)]), p)
    assert "align_faces: several_faces_skipped: two.png: 2 faces (--multiple skip)" in \
        capsys.readouterr().err


def test_library_names_parameters_and_the_programs_their_flags(tmp_path, capsys):
    """The same refusal, from the library (its parameter) and from the program (its flag)."""
    import pytest
    from facetrain.build.folders import BadImageError, folders_to_rec
    from facetrain.build.merge import merge_datasets
    (tmp_path / "faces" / "ann").mkdir(parents=True)
    (tmp_path / "faces" / "ann" / "0.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"or pass `skip_bad=True` to leave undecodable"):
        folders_to_rec(tmp_path / "faces", str(tmp_path / "o" / "train"))
    a, _ = make_dataset(tmp_path / "a", [2, 2])
    b, _ = make_dataset(tmp_path / "b", [1, 2], size=12)
    with pytest.raises(ValueError) as exc:
        merge_datasets([a, b], tmp_path / "m")
    assert "(facetrain.build.folders.folders_to_rec(size=...)), or pass " \
        "`allow_mixed_sizes=True` to merge anyway" in str(exc.value)
    assert tool("merge_rec")([a, b, "--output", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "(`python data_tools/folders_to_rec.py --size`), or pass --allow-mixed-sizes to " \
        "merge anyway" in capsys.readouterr().err
    make_dataset(tmp_path / "out", [1])
    with pytest.raises(ValueError, match=r"pass `overwrite=True` to replace its dataset files"):
        merge_datasets([a, b], tmp_path / "out")      # checked before the sizes

