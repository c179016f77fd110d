"""Checkpoint files: atomic publish, keep-last, `latest`, resume resolution, optimizer-state
resharding, RNG states and the backbone export (torch + ONNX)."""
from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
import torch

from facetrain import checkpoint as ckpt
from facetrain import export
from facetrain.dist import single_process
from facetrain.engines import reshard_optimizer_state


def _save(root, step, keep=2):
    return ckpt.save_checkpoint(root, step, {"step": step}, {"x": torch.tensor([step])},
                                single_process(), keep)


def test_save_publishes_atomically_and_keeps_last(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        path = _save(root, step)
    assert path.name == "ckpt_step15"
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_step10", "ckpt_step15", "latest"]
    meta = ckpt.read_meta(path)
    assert {k: meta[k] for k in ("step", "world_size", "files")} == {
        "step": 15, "world_size": 1, "files": ["replicated.pt", "rank00000.pt"]}
    for name in meta["files"]:               # sizes and CRC-32 recorded for the resume check
        data = (path / name).read_bytes()
        assert meta["digests"][name] == {"bytes": len(data), "crc32": zlib.crc32(data)}
    assert ckpt.load_replicated(path)["step"] == 15
    assert ckpt.load_shard(path, 0)["x"].item() == 15
    # A crash mid-write leaves a temp folder and maybe a folder without meta.json: both ignored.
    (root / ".tmp_ckpt_step20").mkdir()
    (root / "ckpt_step25").mkdir()
    assert ckpt.find_latest(root) == path
    (root / "latest").unlink()                     # the pointer is lost: newest complete one
    assert ckpt.find_latest(root) == path
    assert _save(root, 20).name == "ckpt_step20"   # the stale temp folder is replaced
    assert ckpt.find_latest(root).name == "ckpt_step20"


def test_resolve_resume(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.resolve_resume("auto", root) is None
    path = _save(root, 3)
    assert ckpt.resolve_resume("auto", root) == path
    assert ckpt.resolve_resume("none", root) is None
    assert ckpt.resolve_resume(str(path), tmp_path / "elsewhere") == path
    assert ckpt.resolve_resume(str(root), tmp_path / "elsewhere") == path
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint.*resume=none"):
        ckpt.resolve_resume(str(tmp_path / "nothing"), root)
    with pytest.raises(ckpt.CheckpointError, match="lacks rank00001.pt"):
        ckpt.load_shard(path, 1)


@pytest.mark.parametrize("damage", ["truncate_replicated", "truncate_rank", "flip_rank_byte",
                                    "truncate_meta", "delete_rank"])
def test_damaged_latest_falls_back_to_the_newest_intact(tmp_path, damage):
    root = tmp_path / "checkpoints"
    older, newest = _save(root, 5), _save(root, 10)
    target = {"truncate_replicated": "replicated.pt", "truncate_rank": "rank00000.pt",
              "flip_rank_byte": "rank00000.pt", "truncate_meta": "meta.json",
              "delete_rank": "rank00000.pt"}[damage]
    f = newest / target
    data = f.read_bytes()
    if damage == "flip_rank_byte":
        f.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    elif damage == "delete_rank":
        f.unlink()
    else:
        f.write_bytes(data[:len(data) // 2])
    damaged = []
    assert ckpt.resolve_resume("auto", root, damaged) == older
    assert len(damaged) == 1 and str(f) in damaged[0]
    # An explicitly named damaged checkpoint is an error naming the file, not a fallback.
    with pytest.raises(ckpt.CheckpointError, match=str(f).replace(".", r"\.")):
        ckpt.resolve_resume(str(newest), root)
    # Nothing intact at all: an error naming every damaged file (never a silent fresh start).
    (older / "replicated.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint under .*"
                       + str(older / "replicated.pt").replace(".", r"\.")
                       + ".*checkpoint.resume=none"):
        ckpt.resolve_resume("auto", root)


def test_checkpoints_without_digests_still_resume(tmp_path):
    """Checkpoints written before sizes and checksums were recorded: existence is checked."""
    root = tmp_path / "checkpoints"
    path = _save(root, 5)
    meta = ckpt.read_meta(path)
    del meta["digests"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.resolve_resume("auto", root) == path


def _shard_opt_state(name, rows, start, seed):
    """A real optimizer state over a [rows, 4] classifier block after two steps."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(rows, 4))
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "adam": lambda p: torch.optim.Adam(p, lr=0.1)}[name]([w])
    for _ in range(2):
        w.grad = torch.randn(rows, 4)
        opt.step()
    return {"head_optim": opt.state_dict(), "head_param_rows": [rows],
            "class_range": (start, start + rows)}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_rows_move_with_their_classes(name):
    shards = [_shard_opt_state(name, 4, 0, 1), _shard_opt_state(name, 3, 4, 2)]   # 7 classes
    keys = ["momentum_buffer"] if name == "sgd" else ["exp_avg", "exp_avg_sq"]
    full = {k: torch.cat([s["head_optim"]["state"][0][k] for s in shards]) for k in keys}
    for new_range in [(0, 3), (3, 5), (5, 7), (0, 7)]:        # 2 -> 3 ranks, and 2 -> 1
        out = reshard_optimizer_state(shards[::-1], new_range)   # any order in
        for k in keys:
            torch.testing.assert_close(out["state"][0][k], full[k][slice(*new_range)])
        if name == "adam":                          # the step counter is not a row block
            assert float(out["state"][0]["step"]) == 2.0
        w = torch.nn.Parameter(torch.zeros(new_range[1] - new_range[0], 4))
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9) if name == "sgd" else \
            torch.optim.Adam([w], lr=0.1)
        opt.load_state_dict(out)                    # loadable as is


def test_rng_state_roundtrip():
    dev = torch.device("cpu")
    state = ckpt.rng_state(dev)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state, dev)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_export_backbone_torch_and_onnx(tmp_path):
    import onnx

    from facetrain.eval.embed import load_backbone
    from facetrain.models.registry import build_backbone

    kwargs = {"embedding_size": 16, "dropout": 0.0, "image_size": 16}
    torch.manual_seed(0)
    model = build_backbone("tiny", **kwargs).eval()
    paths = export.export_backbone(model, "tiny", kwargs, tmp_path / "export", image_size=16)
    payload = export.load_exported(paths["torch"])
    assert payload["format"] == "facetrain-backbone" and payload["version"] == 1
    assert payload["backbone"] == "tiny" and payload["kwargs"] == kwargs
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    loaded = load_backbone(paths["torch"], "cpu")
    torch.testing.assert_close(loaded(x), model(x))
    graph = onnx.load(str(paths["onnx"]))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["images"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(export.ExportFormatError, match="not a facetrain-backbone file"):
        export.load_exported(tmp_path / "other.pt")
