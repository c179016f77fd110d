"""Stale indexes, truncated and damaged .rec files: every offset is checked, each message gives
one piece of advice, and following that advice literally (the rebuild_index.py command the tools
print in place of the library's rebuild_indexes call,
data.rebuild_index=true, --force, or re-copying the .rec) ends with a readable dataset or with a
message that no index can help."""
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from facetrain.build.writer import write_insightface_dataset
from facetrain.config import load_config
from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset
from facetrain.data.errors import DatasetError
from test_data_tools import tool
from test_dataset import image_bytes, make_dataset

COUNTS = [3, 2, 2]


def _offsets(prefix: str):
    return rio.read_index(prefix + ".idx")


def _write_idx(prefix: str, keys, offsets) -> None:
    with open(prefix + ".idx", "w") as fh:
        fh.writelines(f"{k}\t{o}\n" for k, o in zip(keys, offsets))


def break_past_end(prefix: str) -> None:
    """An .idx line pointing past the end of the .rec (e.g. an index of a longer file)."""
    keys, offs = _offsets(prefix)
    offs[2] = offs.max() + 10_000
    _write_idx(prefix, keys, offs)


def break_mid_record(prefix: str) -> None:
    """One offset shifted into the middle of a record (only the last record was checked before)."""
    keys, offs = _offsets(prefix)
    offs[2] += 12
    _write_idx(prefix, keys, offs)


def break_rewritten_rec(prefix: str) -> None:
    """The .rec replaced by another dataset's, the old .idx kept."""
    other, _ = make_dataset(Path(prefix).parent / "other", [5, 1], size=20)
    shutil.copy(other + ".rec", prefix + ".rec")
    shutil.copy(Path(other).parent / "property", Path(prefix).parent / "property")


def break_appended(prefix: str) -> None:
    with open(prefix + ".rec", "ab") as fh:
        fh.write(rio.encode_record(rio.pack_irheader(0.0, 99, 0, b"x")))


def break_missing(prefix: str) -> None:
    Path(prefix + ".idx").unlink()


def break_bad_line(prefix: str) -> None:
    with open(prefix + ".idx", "a") as fh:
        fh.write("oops\n")


STALE = {"past_end": (break_past_end, r"past the end of .*train\.rec"),
         "mid_record": (break_mid_record, r"where no record starts"),
         "rewritten": (break_rewritten_rec, r"where no record starts|past the end|inside a split"),
         "appended": (break_appended, r"its last record ends at byte \d+ but .*train\.rec has"),
         "missing": (break_missing, r"train\.idx is missing"),
         "bad_line": (break_bad_line, r"train\.idx: (a line near )?line \d+ is not")}


def _advice_command(msg: str):
    m = re.search(r"`python data_tools/rebuild_index\.py ([^`]+)`", msg)
    assert m, f"no rebuild_index.py command in: {msg}"
    return shlex.split(m.group(1))


def _scan_count(prefix: str) -> int:
    """Records a correct index lists: every record a scan of the .rec finds."""
    return sum(1 for _ in rio.scan_records(prefix + ".rec"))


@pytest.mark.parametrize("case", sorted(STALE))
def test_stale_index_advice_works_when_followed(tmp_path, capsys, case):
    breaker, pattern = STALE[case]
    prefix, items = make_dataset(tmp_path / "d", COUNTS)
    breaker(prefix)
    n_records = _scan_count(prefix)
    broken_idx = (tmp_path / "d" / "train.idx").read_bytes() if case != "missing" else None

    # Detected by every entry point, with the same advice.
    with pytest.raises((DatasetError, FileNotFoundError, rio.RecordIOError), match=pattern) as ei:
        RecordDataset.open(prefix)
    msg = str(ei.value)
    assert "data.rebuild_index=true" in msg and f"{rio.REBUILD_CALL}(" in msg
    assert "data_tools" not in msg                     # the library names no command line
    assert tool("inspect_rec")([prefix]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err
    assert tool("make_longtail")(["--input", prefix, "--output", str(tmp_path / "lt"),
                                  "--head", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "rebuild_index.py" in err
    assert rio.REBUILD_CALL not in err                 # the CLI names its command, not the call
    assert not (tmp_path / "lt").exists()

    # Advice 1: the command the CLI printed, literally.
    assert tool("rebuild_index")(_advice_command(err) + ["--no-progress"]) == 0
    assert "rebuilt 1 index file(s)" in capsys.readouterr().out
    ds = RecordDataset.open(prefix)
    assert len(rio.read_index(prefix + ".idx")[0]) == n_records
    if case in ("rewritten",):
        assert ds.class_counts.tolist() == [5, 1]
    elif case != "appended":
        assert [ds.read(i) for i in range(len(ds))] == items

    # Advice 2: data.rebuild_index=true (what the trainer's loader does with it).
    if broken_idx is None:
        (tmp_path / "d" / "train.idx").unlink()
    else:
        (tmp_path / "d" / "train.idx").write_bytes(broken_idx)
    cfg = load_config(None, [f"data.rec={prefix}", "data.rebuild_index=true"])
    ds = RecordDataset.open(cfg.data.rec, rebuild_index=cfg.data.rebuild_index)
    assert len(rio.read_index(prefix + ".idx")[0]) == n_records and len(ds) > 0


def test_force_rebuilds_even_a_matching_index(tmp_path, capsys):
    prefix, items = make_dataset(tmp_path / "d", COUNTS, shard_size=3)
    assert tool("rebuild_index")([prefix, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "--force" in out
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").glob("*.idx")}
    assert tool("rebuild_index")([prefix, "--force", "--no-progress"]) == 0
    assert "rebuilt 3 index file(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").glob("*.idx")} == before
    ds = RecordDataset.open(prefix)
    assert [ds.read(i) for i in range(len(ds))] == items


def test_mid_record_offset_is_not_reported_as_matching(tmp_path, capsys):
    prefix, _ = make_dataset(tmp_path / "d", COUNTS)
    break_mid_record(prefix)
    assert tool("rebuild_index")([prefix, "--no-progress"]) == 0
    assert "rebuilt 1 index file(s)" in capsys.readouterr().out


def test_truncated_rec_gets_one_message_from_every_tool(tmp_path, capsys):
    prefix, items = make_dataset(tmp_path / "d", COUNTS)
    rec = tmp_path / "d" / "train.rec"
    good = rec.read_bytes()
    keys, offs = _offsets(prefix)
    cut = int(offs[4]) + 20                                  # inside image key 4
    rec.write_bytes(good[:cut])
    idx_before = (tmp_path / "d" / "train.idx").read_bytes()
    want = (f"{rec} is truncated: the file ends at byte {cut}, inside the record that starts at "
            f"byte {int(offs[4])}; it was cut short (an interrupted copy or download?): re-copy "
            "it from its source (rebuilding the index cannot bring back missing bytes)")
    msgs = {}
    for name, argv in (("make_longtail", ["--input", prefix, "--output", str(tmp_path / "lt"),
                                          "--head", "1", "--no-progress"]),
                       ("rebuild_index", [prefix, "--no-progress"]),
                       ("rebuild_index --force", [prefix, "--force", "--no-progress"]),
                       ("inspect_rec", [prefix])):
        assert tool(name.split()[0])(argv) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err
        msgs[name] = err.strip().split(": ", 1)[1].replace("unhealthy: ", "")
    assert set(msgs.values()) == {want}, msgs
    assert (tmp_path / "d" / "train.idx").read_bytes() == idx_before          # input untouched
    assert rec.read_bytes() == good[:cut]
    assert not (tmp_path / "lt").exists()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["property", "train.idx", "train.rec"]
    rec.write_bytes(good)                                     # the advice: re-copy it
    ds = RecordDataset.open(prefix)
    assert [ds.read(i) for i in range(len(ds))] == items


def test_damaged_rec_rebuild_says_recopy_and_keeps_the_old_index(tmp_path, capsys):
    prefix, items = make_dataset(tmp_path / "d", COUNTS)
    rec = tmp_path / "d" / "train.rec"
    good = rec.read_bytes()
    keys, offs = _offsets(prefix)
    data = bytearray(good)
    data[int(offs[3]):int(offs[3]) + 4] = b"\0\0\0\0"         # corrupt magic word of key 3
    rec.write_bytes(bytes(data))
    idx_before = (tmp_path / "d" / "train.idx").read_bytes()
    with pytest.raises(DatasetError, match="where no record starts"):
        RecordDataset.open(prefix)
    assert tool("inspect_rec")([prefix]) == 2
    advice = _advice_command(capsys.readouterr().err)
    assert tool("rebuild_index")(advice + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{rec} is damaged at byte {int(offs[3])}" in err and "re-copy it" in err
    assert "rebuild_index.py" not in err.split("rebuild_index: ", 1)[1]   # no loop back
    assert (tmp_path / "d" / "train.idx").read_bytes() == idx_before
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]
    rec.write_bytes(good)
    assert [RecordDataset.open(prefix).read(i) for i in range(len(items))] == items


def test_inspect_rec_reports_corrupt_magic_without_check_decode(tmp_path, capsys):
    prefix, _ = make_dataset(tmp_path / "d", COUNTS)
    keys, offs = _offsets(prefix)
    rec = tmp_path / "d" / "train.rec"
    data = bytearray(rec.read_bytes())
    data[int(offs[5]) + 1] ^= 0xFF
    rec.write_bytes(bytes(data))
    assert tool("inspect_rec")([prefix]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inspect_rec: unhealthy: ") and err.count("\n") == 1
    assert f"key 5 points at byte {int(offs[5])}, where no record starts" in err


def test_inspect_rec_healthy_reports_framing_and_decode_progress(tmp_path, capsys):
    prefix, _ = make_dataset(tmp_path / "d", [300, 2])
    assert tool("inspect_rec")([prefix]) == 0
    assert "framing       ok at every indexed offset" in capsys.readouterr().out
    assert tool("inspect_rec")([prefix, "--check-decode"]) == 0
    cap = capsys.readouterr()
    assert "undecodable   0" in cap.out and "decode" in cap.err      # tqdm bar on stderr


def test_check_decode_lists_a_damaged_split_record(tmp_path, capsys):
    """Damage after the first part of a split record: framing is fine, --check-decode finds it."""
    magic = np.uint32(rio.MAGIC).tobytes()
    items = [(0, b"abcd" + magic + b"efgh"), (0, image_bytes(0, 1))]

    write_insightface_dataset(tmp_path / "d" / "train", items, 1, 8)
    prefix = str(tmp_path / "d" / "train")
    keys, offs = _offsets(prefix)
    rec = tmp_path / "d" / "train.rec"
    data = bytearray(rec.read_bytes())
    second_part = int(offs[1]) + 8 + 24 + 4                   # header, IRHeader, "abcd"
    assert data[second_part:second_part + 4] == magic
    data[second_part:second_part + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    assert tool("inspect_rec")([prefix]) == 0
    capsys.readouterr()
    assert tool("inspect_rec")([prefix, "--check-decode", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "undecodable   1" in out and f"is damaged at byte {second_part}" in out
