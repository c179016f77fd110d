"""launch/train_face.py end to end: torchrun with 2 CPU processes on the DALI loader, the
multi-node path (two `torchrun --nnodes=2` launchers meeting over c10d on localhost), config
errors, the missing-data message, and every shipped config."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

from facetrain.config import ConfigError, load_config  # noqa: E402
from facetrain.logging_utils import read_metrics  # noqa: E402

LAUNCH = str(REPO / "launch" / "train_face.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_torchrun_two_processes_dali_loss_falls(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run(
        _torchrun("--standalone", "--nproc_per_node=2", LAUNCH,
                  *tiny_overrides(rec, out, ["data.loader=dali", "data.num_workers=1",
                                             "train.tensorboard=true", "checkpoint.resume=none"])),
        capture_output=True, text=True, env=_env(), timeout=300)
    _check(proc)
    m = read_metrics(out / "metrics.jsonl")
    loss = np.array([m[k]["loss"] for k in sorted(m)])
    assert len(loss) == 45 and loss[-15:].mean() < 0.6 * loss[:5].mean(), loss
    assert {"lr", "samples_per_s", "leap_pooled_var", "leap_num_perturbed"} <= set(m[45])
    log = (out / "log.txt").read_text()
    assert "world 2 (gloo, cpu)" in log and "samples/s" in log and "eta" in log
    assert any((out / "tensorboard").iterdir())
    assert load_config(out / "config.yaml").data.loader == "dali"     # resolved config saved
    for name in ("export/backbone.pt", "export/backbone.onnx", "leap_stats_end.npz"):
        assert (out / name).is_file(), name


def test_multinode_path_two_launchers(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    for attempt in range(3):       # the endpoint port is chosen before torchrun binds it
        port, procs, results = _port(), [], []
        out = tmp_path / f"run{attempt}"
        for node in range(2):
            cmd = _torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                            f"--rdzv_conf=is_host={int(node == 0)}", "--rdzv_id=facetrain-test",
                            LAUNCH, *tiny_overrides(rec, out, ["train.max_steps=6",
                                                               "checkpoint.resume=none"]))
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=_env()))
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            results.append((p.returncode, stdout, stderr))
        if not any(rc and "ddress already in use" in err for rc, _, err in results):
            break
    for rc, stdout, stderr in results:
        assert rc == 0, stdout[-3000:] + stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "world 2 (gloo, cpu)" in log and "done: step 6" in log
    assert len(read_metrics(out / "metrics.jsonl")) == 6


def _launch(args, cwd=REPO):
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=120)


def test_config_errors_and_missing_data(tmp_path):
    proc = _launch(["optim.lrr=0.1"])
    assert proc.returncode == 2 and "unknown config key 'optim.lrr'" in proc.stderr
    proc = _launch(["head.sample_rate=1.5"])
    assert proc.returncode == 2 and "head.sample_rate must be in (0.0, 1.0]" in proc.stderr
    proc = _launch(["--config", str(tmp_path / "nope.yaml")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    # No arguments: the default config, whose data is missing from this working directory.
    proc = _launch([], cwd=tmp_path)
    assert proc.returncode == 2
    assert "data/longtail_H100_Tall_S3" in proc.stderr and "build_glyphs.py" in proc.stderr
    assert "make_longtail.py" in proc.stderr
    # data.rec has no library default: an empty one is named before any process group starts.
    proc = _launch(["data.rec="], cwd=tmp_path)
    assert proc.returncode == 2 and "data.rec is not set" in proc.stderr
    assert "build_glyphs.py" in proc.stderr
    # Nor has train.output_dir: the program names the field and its flag; the library the field.
    proc = _launch(["train.output_dir="], cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.output_dir is not set" in proc.stderr and "--output-dir PATH" in proc.stderr
    from facetrain.config import Config
    from facetrain.dist import single_process
    from facetrain.trainer import Trainer

    assert Config().train.output_dir == ""
    with pytest.raises(ConfigError, match=r"^train\.output_dir is not set: give the run folder "
                                          r"\(train\.output_dir=PATH\)$"):
        Trainer(Config(), single_process())


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_every_shipped_config_is_valid():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "ms1mv3_r50.yaml", "reid_h20_s5_r50_adam.yaml"} <= names
    for split in ("h5k_t10k", "h3k_t20k", "h5k_t20k", "h3k_t10k"):
        for margin in ("cosface", "arcface"):
            for mode in ("off", "vanilla", "full"):
                assert f"face_{split}_r18_{margin}_leap_{mode}.yaml" in names
    for path in SHIPPED:
        cfg = load_config(path)
        if cfg.schedule.name == "cyclic" and cfg.leap.mode != "off":
            # Paper: the feature cloud starts with the third cycle of the triangular policy.
            assert cfg.leap.start_epoch == 2 * cfg.schedule.cycle_epochs, path.name
            assert cfg.train.epochs == 3 * cfg.schedule.cycle_epochs, path.name
        if path.name.startswith("face_"):
            assert cfg.schedule.name == "cyclic" and cfg.train.epochs == 30
            assert cfg.model.backbone == "iresnet18" and cfg.head.margin.scale == 64
            assert cfg.leap.mode == path.stem.rsplit("_", 1)[1]
        if path.name.startswith("reid_"):
            assert cfg.optim.name == "adam" and cfg.model.backbone == "resnet50_reid"
            # Vanilla LEAP's head/tail split: tail classes have exactly S images.
            split = re.fullmatch(r"reid_h(\d+)_s(\d+)_.*", path.stem)
            assert f"_H{split[1]}_Tall_S{split[2]}" in cfg.data.rec, path.name
            assert cfg.leap.head_threshold == int(split[2]), path.name
    for h, s in ((20, 5), (150, 5), (100, 5), (50, 5), (20, 4), (20, 3)):
        assert f"reid_h{h}_s{s}_r50_adam.yaml" in names


def test_misspelled_key_in_a_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO / "configs" / "default.yaml") + "\nleap:\n  strat_epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'leap.strat_epoch'"):
        load_config(bad)


def test_help_lists_every_config_section_and_where_fields_are_documented():
    proc = subprocess.run([sys.executable, LAUNCH, "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    import dataclasses

    from facetrain.config import Config
    for f in dataclasses.fields(Config):
        assert f"  {f.name}: " in proc.stdout, f.name
    assert "leap: LEAP feature cloud" in proc.stdout and "width_scale=1.0" in proc.stdout
    assert "facetrain/config.py" in proc.stdout and "docs/leap.md" in proc.stdout
