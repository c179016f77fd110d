"""Training with bad input, as a user meets it under torchrun (2 gloo ranks): one message per
job that names the file and says what to do, no Python traceback, a non-zero exit; a damaged
latest checkpoint is skipped for the newest intact one with a warning naming the file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

LAUNCH = str(REPO / "launch" / "train_face.py")


def _run(*overrides, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", LAUNCH, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _our_lines(proc) -> list:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if "train_face.py:" in ln]


def _assert_one_clean_message(proc, *needles):
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    # torchrun's own summary of a failed job is a traceback of torch's agent; none of ours.
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-3000:]
    assert 'launch/train_face.py", line' not in text and "facetrain/" not in text, text[-3000:]
    lines = _our_lines(proc)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_idx_is_one_message(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    Path(rec + ".idx").unlink()
    proc = _run(*tiny_overrides(rec, tmp_path / "out"))
    _assert_one_clean_message(proc, "train.idx")


def test_batch_larger_than_dataset_is_one_message(tmp_path):
    rec = make_tiny_rec(tmp_path / "data", counts=[3] * 4)        # 12 images
    proc = _run(*tiny_overrides(rec, tmp_path / "out", ["data.batch_size=16"]))
    _assert_one_clean_message(proc, "data.batch_size=16", "lower data.batch_size")


def test_non_finite_config_value_is_one_message(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    proc = _run(*tiny_overrides(rec, tmp_path / "out", ["optim.lr=nan"]))
    _assert_one_clean_message(proc, "optim.lr must be a finite number")


def test_damaged_latest_checkpoint_falls_back_then_errors_when_none_is_intact(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "out"
    base = tiny_overrides(rec, out, ["checkpoint.every_steps=4", "checkpoint.keep_last=3"])
    first = _run(*base, "train.max_steps=8")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "ckpt_step8"
    damaged = ckpts / "ckpt_step8" / "rank00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])                 # a truncated copy
    second = _run(*base, "train.max_steps=10")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"WARNING: skipping a damaged checkpoint: {damaged}" in log
    assert "resumed from " + str(ckpts / "ckpt_step4") in log
    assert "done: step 10" in log
    # Every checkpoint damaged: a clear error naming the files, nothing trained from scratch.
    for ck in ckpts.glob("ckpt_step*"):
        (ck / "replicated.pt").write_bytes(b"")
    third = _run(*base, "train.max_steps=12")
    _assert_one_clean_message(third, "no intact checkpoint under", "replicated.pt",
                              "checkpoint.resume=none")


def _idx_offsets(rec: str) -> dict:
    return {int(k): int(v) for k, v in (ln.split("\t") for ln in
                                        Path(rec + ".idx").read_text().split("\n") if ln)}


def test_corrupt_record_is_one_message_before_training(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    offsets = _idx_offsets(rec)
    key = sorted(offsets)[5]
    data = bytearray(Path(rec + ".rec").read_bytes())
    data[offsets[key]] ^= 0xFF                                     # a damaged magic word
    Path(rec + ".rec").write_bytes(bytes(data))
    proc = _run(*tiny_overrides(rec, tmp_path / "out"))
    _assert_one_clean_message(proc, "train.rec")
    assert not (tmp_path / "out" / "checkpoints").exists()       # stopped before the first step


def test_skipped_images_are_in_the_run_log(tmp_path):
    """With data.skip_bad_images=true an undecodable image is replaced, and the warning reaches
    log.txt (not only the console)."""
    from facetrain.build.writer import write_insightface_dataset
    import cv2
    import numpy as np

    items = []
    rng = np.random.RandomState(0)
    for label in range(4):
        for k in range(6):
            ok, buf = cv2.imencode(".jpg", rng.randint(0, 255, (16, 16, 3)).astype(np.uint8))
            items.append((label, b"not an image" if (label, k) == (1, 2) else buf.tobytes()))
    (tmp_path / "data").mkdir()
    write_insightface_dataset(tmp_path / "data" / "train", items, num_classes=4, image_size=16)
    out = tmp_path / "out"
    proc = _run(*tiny_overrides(str(tmp_path / "data" / "train"), out,
                                ["data.skip_bad_images=true", "train.epochs=1"]), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: 1 undecodable images replaced so far" in (out / "log.txt").read_text()


# ---- issue 18: the remaining bad inputs, one message each ---------------------------------
def _items_with_bad_images(bad):
    import cv2
    import numpy as np

    items = []
    rng = np.random.RandomState(0)
    for label in range(4):
        for k in range(6):
            ok, buf = cv2.imencode(".jpg", rng.randint(0, 255, (16, 16, 3)).astype(np.uint8))
            items.append((label, b"not an image" if bad(label, k) else buf.tobytes()))
    return items


def test_resume_with_a_changed_model_is_one_message_from_rank0(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "out"
    first = _run(*tiny_overrides(rec, out, ["train.max_steps=5"]))
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _run(*tiny_overrides(rec, out, ["train.max_steps=10", "model.embedding_size=16"]))
    _assert_one_clean_message(
        proc, f"train_face.py: checkpoint {out / 'checkpoints' / 'ckpt_step5'} does not fit this "
        "run: model.embedding_size is 32 there and 16 here; resume with the same model, or "
        "start fresh with checkpoint.resume=none")
    assert "ckpt_step10" not in os.listdir(out / "checkpoints")        # no step was taken


def test_fewer_classes_than_ranks_is_one_message(tmp_path):
    rec = make_tiny_rec(tmp_path / "data", counts=[12])                # one class, two ranks
    proc = _run(*tiny_overrides(rec, tmp_path / "out"))
    _assert_one_clean_message(
        proc, f"train_face.py: {rec} has 1 classes, fewer than the 2 ranks of this run: every "
        "rank's classifier block needs at least one class; run on at most 1 ranks")


def test_warnings_of_every_rank_reach_the_run_log(tmp_path):
    from facetrain.build.writer import write_insightface_dataset

    (tmp_path / "data").mkdir()
    write_insightface_dataset(tmp_path / "data" / "train",
                              _items_with_bad_images(lambda label, k: k % 3 == 1),
                              num_classes=4, image_size=16)
    out = tmp_path / "out"
    proc = _run(*tiny_overrides(str(tmp_path / "data" / "train"), out,
                                ["data.skip_bad_images=true", "train.epochs=1"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re
    # The ranks share one stderr, where lines may run into each other: find rank 1's by form.
    rank1 = re.findall(r"WARNING: rank 1: skipping undecodable image \S+: record key \d+ at "
                       r"byte \d+", proc.stderr)
    assert rank1, proc.stderr[-3000:]                     # a third of the images are bad
    log = (out / "log.txt").read_text()
    for line in rank1:
        assert line in log, line


def test_bad_image_during_training_is_one_message_without_a_peer_traceback(tmp_path):
    """An undecodable image found mid-training (not skipped) stops the run: the rank that read
    it names the record; its peer's "Connection closed by peer" is not shown."""
    from facetrain.build.writer import write_insightface_dataset

    (tmp_path / "data").mkdir()
    write_insightface_dataset(tmp_path / "data" / "train",
                              _items_with_bad_images(lambda label, k: (label, k) == (2, 3)),
                              num_classes=4, image_size=16)
    proc = _run(*tiny_overrides(str(tmp_path / "data" / "train"), tmp_path / "out"))
    _assert_one_clean_message(proc, "train.rec: record key", "cannot be decoded")
    assert "Connection closed" not in proc.stdout + proc.stderr
