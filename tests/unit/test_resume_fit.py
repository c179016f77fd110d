"""Resuming with a changed model is one CheckpointError from rank 0, before the first step,
naming the field and both values (the e2e twin under torchrun is in
tests/e2e/test_launch_faults.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_config  # noqa: E402

from facetrain.checkpoint import CheckpointError, load_replicated  # noqa: E402
from facetrain.dist import SetupFailedError, single_process  # noqa: E402
from facetrain.trainer import Trainer, check_same_model  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_fit")
    rec = make_tiny_rec(tmp / "data")
    out = tmp / "out"
    Trainer(tiny_config(rec, out, ["train.max_steps=2", "train.epochs=1"]),
            single_process()).fit()
    return rec, out, out / "checkpoints" / "ckpt_step2"


def test_changed_embedding_size_is_one_message_before_training(saved):
    rec, out, ckpt = saved
    cfg = tiny_config(rec, out, ["model.embedding_size=16", "train.max_steps=4"])
    with pytest.raises(SetupFailedError) as info:
        Trainer(cfg, single_process())
    assert info.value.report and isinstance(info.value.cause, CheckpointError)
    assert str(info.value.cause) == (
        f"checkpoint {ckpt} does not fit this run: model.embedding_size is 32 there and 16 "
        "here; resume with the same model, or start fresh with checkpoint.resume=none (or "
        "another train.output_dir)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_step2", "latest"]


def test_changed_backbone_classes_and_image_size_are_named(saved):
    rec, out, ckpt = saved
    rep = load_replicated(ckpt)
    same = {"model.backbone": "tiny", "model.embedding_size": 32, "data.image_size": "16x16",
            "the number of classes (of data.rec)": rep["num_classes"]}
    check_same_model(ckpt, rep, same)                    # the saving run's own facts pass
    for field, value, there in (("model.backbone", "iresnet50", "tiny"),
                                ("the number of classes (of data.rec)", 99,
                                 rep["num_classes"]),
                                ("data.image_size", "112x112", "16x16")):
        with pytest.raises(CheckpointError) as info:
            check_same_model(ckpt, rep, {**same, field: value})
        assert f"does not fit this run: {field} is {there} there and {value} here;" \
            in str(info.value)
