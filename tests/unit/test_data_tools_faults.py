"""Data tools under bad output locations, bad images, a full disk and SIGTERM: a non-zero exit,
one message naming the path, no traceback, the input untouched, no temporary file left."""
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset
from test_data_tools import tool
from test_dataset import make_dataset

REPO = Path(__file__).resolve().parents[2]
COUNTS = [6, 4, 3, 3]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones included) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list:
    return [str(p) for p in folder.rglob(".*")] if folder.exists() else []


def longtail_args(src: str, out: Path, *extra: str) -> list:
    return ["--input", src, "--output", str(out), "--head", "1", "--tail-samples", "2",
            "--no-progress", *extra]


def _one_message(err: str, tool_name: str) -> str:
    """The tool's single error line (status log lines such as "WARNING rebuilding X" aside)."""
    lines = [ln for ln in err.splitlines()
             if ln.strip() and not ln.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and lines[0].startswith(f"{tool_name}: "), err
    assert "Traceback" not in err
    return lines[0]


# --- make_longtail output location ----------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside"])
def test_make_longtail_refuses_output_in_the_input_folder(tmp_path, capsys, where):
    src, _ = make_dataset(tmp_path / "src", COUNTS)
    (tmp_path / "src" / "labels.csv").write_text("label,identity,images\n")
    before = snapshot(tmp_path / "src")
    out = tmp_path / "src" if where == "same" else tmp_path / "src" / "sub"
    for extra in ((), ("--overwrite",)):                    # not even with --overwrite
        assert tool("make_longtail")(longtail_args(src, out, *extra)) == 2
        msg = _one_message(capsys.readouterr().err, "make_longtail")
        assert str(out) in msg and str((tmp_path / "src").resolve()) in msg
        assert "choose an output folder outside it" in msg
    assert snapshot(tmp_path / "src") == before
    assert not (tmp_path / "src" / "sub").exists()


def test_make_longtail_refuses_a_non_empty_output_without_overwrite(tmp_path, capsys):
    src, _ = make_dataset(tmp_path / "src", COUNTS)
    out = tmp_path / "out"
    assert tool("make_longtail")(longtail_args(src, out)) == 0
    capsys.readouterr()
    (out / "train.json").write_text("{}")                    # a user's file, not the dataset's
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert tool("make_longtail")(longtail_args(src, out)) == 2
    msg = _one_message(capsys.readouterr().err, "make_longtail")
    assert f"output folder {out} already holds" in msg and "--overwrite" in msg
    assert snapshot(out) == before
    # --overwrite replaces the dataset files only, and says which files it replaces and keeps.
    make_dataset(tmp_path / "src2", [5, 5, 2], size=20)
    src2 = str(tmp_path / "src2" / "train")
    assert tool("make_longtail")(longtail_args(src2, out, "--overwrite", "--shard-size", "3")) == 0
    assert RecordDataset.open(str(out)).class_counts.tolist() == [5, 2, 2]
    assert (out / "train.json").read_text() == "{}" and (out / "notes.txt").read_text() == "mine"
    assert not (out / "train.rec").exists() and (out / "train_000.rec").exists()


def test_overwrite_says_what_it_replaces(tmp_path, caplog):
    from facetrain.build.longtail import make_longtail

    src, _ = make_dataset(tmp_path / "src", COUNTS)
    out = tmp_path / "out"
    make_longtail(src, str(out), 1, None, 2)
    (out / "notes.txt").write_text("mine")
    make_longtail(src, str(out), 2, None, 2, overwrite=True)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"overwriting {out}: replacing manifest.csv, property, train.idx, train.rec" in msg
    assert "keeping notes.txt" in msg


# --- folders_to_rec bad images --------------------------------------------------------------

def _faces(root: Path) -> None:
    for who, n in (("alice", 3), ("bob", 2)):
        for i in range(n):
            (root / who).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / who / f"{i}.jpg"), np.full((12, 10, 3), 40 * i, np.uint8))


@pytest.mark.parametrize("content", [b"", b"not a jpeg"])
def test_folders_to_rec_names_a_bad_jpg_and_offers_skip_bad(tmp_path, capsys, content):
    _faces(tmp_path / "faces")
    bad = tmp_path / "faces" / "bob" / "1.jpg"
    bad.write_bytes(content)
    prefix = tmp_path / "out" / "train"
    for extra in ((), ("--size", "8")):
        assert tool("folders_to_rec")([str(tmp_path / "faces"), str(prefix), "--no-progress",
                                       *extra]) == 2
        msg = _one_message(capsys.readouterr().err, "folders_to_rec")
        assert f"{bad}: " in msg and "--skip-bad" in msg
        assert ("empty file (0 bytes)" if not content else "cannot be decoded") in msg
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    # The advice, followed: --skip-bad leaves the file out and lists it.
    assert tool("folders_to_rec")([str(tmp_path / "faces"), str(prefix), "--no-progress",
                                   "--skip-bad"]) == 0
    cap = capsys.readouterr()
    assert f"folders_to_rec: skipped {bad}: " in cap.err
    assert "1 undecodable files skipped" in cap.out
    assert RecordDataset.open(str(prefix)).class_counts.tolist() == [3, 1]


def test_folders_to_rec_zero_byte_first_image_without_check(tmp_path, capsys):
    _faces(tmp_path / "faces")
    bad = tmp_path / "faces" / "alice" / "0.jpg"
    bad.write_bytes(b"")
    assert tool("folders_to_rec")([str(tmp_path / "faces"), str(tmp_path / "o" / "train"),
                                   "--no-check", "--no-progress"]) == 2
    msg = _one_message(capsys.readouterr().err, "folders_to_rec")
    assert f"{bad}: empty file (0 bytes)" in msg and "--skip-bad" in msg


# --- a full disk ----------------------------------------------------------------------------

class FullDisk:
    """A file whose writes fail with ENOSPC once `budget` bytes were written."""

    def __init__(self, fh, budget: list):
        self._fh, self._budget = fh, budget

    def write(self, data):
        self._budget[0] -= len(data)
        if self._budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def fill_disk_after(monkeypatch, nbytes: int) -> None:
    """Every file the RecordIO writers open fails with ENOSPC after `nbytes` bytes in total."""
    budget = [nbytes]
    monkeypatch.setattr(rio, "open", lambda *a, **k: FullDisk(open(*a, **k), budget),
                        raising=False)


@pytest.mark.parametrize("how", ["write_raw", "file"])
def test_make_longtail_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch, how):
    src, _ = make_dataset(tmp_path / "src", COUNTS)
    before = snapshot(tmp_path / "src")
    out = tmp_path / "out"
    if how == "write_raw":                          # the writer's write itself fails
        real = rio.IndexedRecordWriter.write_raw
        calls = []

        def write_raw(self, key, framed):
            calls.append(key)
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, key, framed)
        monkeypatch.setattr(rio.IndexedRecordWriter, "write_raw", write_raw)
    else:                                           # the bytes reach a file on a full disk
        fill_disk_after(monkeypatch, 300)
    assert tool("make_longtail")(longtail_args(src, out)) == 2
    msg = _one_message(capsys.readouterr().err, "make_longtail")
    assert f"cannot write the dataset {out / 'train'}: No space left on device (ENOSPC)" in msg
    assert f"{out / '.train.rec.tmp'}" in msg and "free space" in msg
    assert not out.exists()                         # it created the folder: removed again
    assert snapshot(tmp_path / "src") == before


def test_folders_to_rec_and_rebuild_index_disk_full(tmp_path, capsys, monkeypatch):
    _faces(tmp_path / "faces")
    fill_disk_after(monkeypatch, 200)
    prefix = tmp_path / "out" / "train"
    assert tool("folders_to_rec")([str(tmp_path / "faces"), str(prefix), "--no-progress"]) == 2
    msg = _one_message(capsys.readouterr().err, "folders_to_rec")
    assert f"cannot write the dataset {prefix}: No space left on device" in msg
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    from facetrain.build import output

    budget = [10]                                   # labels.csv, written before the dataset
    monkeypatch.setattr(output, "open", lambda *a, **k: FullDisk(open(*a, **k), budget),
                        raising=False)
    assert tool("folders_to_rec")([str(tmp_path / "faces"), str(prefix), "--no-progress"]) == 2
    msg = _one_message(capsys.readouterr().err, "folders_to_rec")
    assert f"cannot write {tmp_path / 'out' / 'labels.csv'}: No space left on device" in msg
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    src, _ = make_dataset(tmp_path / "src", COUNTS)
    (tmp_path / "src" / "train.idx").unlink()
    fill_disk_after(monkeypatch, 20)
    assert tool("rebuild_index")([src, "--no-progress"]) == 2
    msg = _one_message(capsys.readouterr().err, "rebuild_index")
    assert f"cannot write {tmp_path / 'src' / 'train.idx'}: No space left on device" in msg
    assert f"{tmp_path / 'src' / '.train.idx.tmp'}" in msg and "free space" in msg
    assert not hidden(tmp_path / "src") and not (tmp_path / "src" / "train.idx").exists()


# --- SIGTERM mid-write ----------------------------------------------------------------------

def test_sigterm_during_a_commit_waits_for_its_end():
    from test_data_tools import TOOLS

    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    from _interrupt import Terminated, sigterm_raises

    from facetrain.build.writer import signals_deferred

    done = []
    with pytest.raises(Terminated) as ei:
        with sigterm_raises():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("renames finished")
            done.append("not reached")
    assert done == ["renames finished"] and ei.value.code == 143


SLOW_CHILD = textwrap.dedent("""
    import importlib.util, sys, time
    from facetrain.data import recordio as rio

    def slowed(fn):
        def wrapper(*a, **k):
            out = fn(*a, **k)
            print("WRITING", flush=True)        # a temporary file now exists
            time.sleep(0.2)
            return out
        return wrapper

    rio.IndexedRecordWriter.write = slowed(rio.IndexedRecordWriter.write)
    rio.IndexedRecordWriter.write_raw = slowed(rio.IndexedRecordWriter.write_raw)
    real_scan = rio.scan_records
    def slow_scan(path):
        for item in real_scan(path):
            print("WRITING", flush=True)
            time.sleep(0.2)
            yield item
    rio.scan_records = slow_scan
    name = sys.argv[1]
    sys.path.insert(0, "data_tools")      # as `python data_tools/NAME.py` has it
    spec = importlib.util.spec_from_file_location(name, f"data_tools/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.exit(mod.main(sys.argv[2:]))
""")


def run_and_terminate(args: list, child: str = SLOW_CHILD) -> subprocess.CompletedProcess:
    """Run `child` (Python source) with `args`, SIGTERM it once it prints WRITING."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "WRITING":
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("name", ["make_longtail", "folders_to_rec", "rebuild_index"])
def test_sigterm_mid_write_removes_temporary_files(tmp_path, name):
    src, _ = make_dataset(tmp_path / "src", COUNTS)
    out = tmp_path / "out"
    if name == "make_longtail":
        args = longtail_args(src, out)
        watched = out
    elif name == "folders_to_rec":
        _faces(tmp_path / "faces")
        args = [str(tmp_path / "faces"), str(out / "train"), "--no-progress"]
        watched = out
    else:
        (tmp_path / "src" / "train.idx").unlink()
        args = [src, "--no-progress"]
        watched = tmp_path / "src"
    before = snapshot(tmp_path / "src")
    res = run_and_terminate([name, *args])
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    msg = _one_message(res.stderr, name)
    assert "stopped by SIGTERM while writing" in msg and "temporary files were removed" in msg
    assert not hidden(watched), hidden(watched)
    assert snapshot(tmp_path / "src") == before
    if name != "rebuild_index":
        assert not out.exists()
