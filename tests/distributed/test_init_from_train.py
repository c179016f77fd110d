"""A run started with model.init_from: backbone from a checkpoint folder, a fresh classifier,
the file and its sha256 in config.yaml, optim.backbone_lr_scale in force, and a restart resumes
from the run's own checkpoint instead of re-initialising."""
from __future__ import annotations

import hashlib

import torch
import yaml

from test_train_data import make_tiny_rec, tiny_config
from facetrain import checkpoint as ckpt
from facetrain.dist import single_process
from facetrain.trainer import Trainer


def test_init_from_checkpoint_then_resume(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    one = single_process()
    base = ["leap.mode=off"]
    Trainer(tiny_config(rec, tmp_path / "src", base), one).fit(stop_after=3)
    src = ckpt.find_latest(tmp_path / "src" / "checkpoints")
    saved = ckpt.load_replicated(src)

    extra = base + [f"model.init_from={src}", "optim.backbone_lr_scale=0.5"]
    t = Trainer(tiny_config(rec, tmp_path / "ft", extra), one)
    for k, v in t.engine.backbone.state_dict().items():
        assert torch.equal(v, saved["backbone"][k]), k
    fresh = Trainer(tiny_config(rec, tmp_path / "fresh", base), one)
    assert torch.equal(t.head.weight, fresh.head.weight)     # a fresh classifier, as a new run
    assert not torch.equal(t.head.weight, ckpt.load_rank_file(src, 0)["head"]["weight"])
    fresh.fit(stop_after=0)

    t.fit(stop_after=2)
    backbone_opt, head_opt = t.engine.optimizers
    assert backbone_opt.param_groups[0]["lr"] == 0.5 * head_opt.param_groups[0]["lr"] > 0
    recorded = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["model"]
    file = src / "replicated.pt"
    assert recorded["init_from"] == str(file.resolve())
    assert recorded["init_from_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    own = ckpt.find_latest(tmp_path / "ft" / "checkpoints")
    assert own.name == "ckpt_step2"

    # The same command again: the run's own checkpoint wins over init_from.
    again = Trainer(tiny_config(rec, tmp_path / "ft", extra), one)
    assert again.step == 2
    mine = ckpt.load_replicated(own)["backbone"]
    for k, v in again.engine.backbone.state_dict().items():
        assert torch.equal(v, mine[k]), k
    again.fit(stop_after=3)
    log = (tmp_path / "ft" / "log.txt").read_text()
    assert "backbone initialised from" in log and "model.init_from ignored: resuming" in log
