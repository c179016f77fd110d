"""Checkpoint files: atomic publish, keep-last, `latest`, resume resolution, optimizer-state
resharding, RNG states and the backbone export (torch + ONNX)."""
from __future__ import annotations

import enum
import errno
import json
import os
import random
import zlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from facetrain import checkpoint as ckpt
from facetrain import export
from facetrain.dist import single_process
from facetrain.heads.partition import reshard_optimizer_state


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
    assert ckpt.load_rank_file(path, 0)["x"].item() == 15
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
        ckpt.load_rank_file(path, 1)


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
    ranges = {3: [(0, 3), (3, 5), (5, 7)], 1: [(0, 7)]}          # 2 -> 3 ranks, and 2 -> 1
    for world_size, blocks in ranges.items():
        outs = reshard_optimizer_state(shards[::-1], world_size)  # any order in
        assert len(outs) == world_size
        for new_range, out in zip(blocks, outs):
            _check_resharded(name, keys, full, new_range, out)


def _check_resharded(name, keys, full, new_range, out):
    """One re-split block holds its classes' rows of the whole state, and an optimizer over
    that block loads it as is."""
    for k in keys:
        torch.testing.assert_close(out["state"][0][k], full[k][slice(*new_range)])
    if name == "adam":                          # the step counter is not a row block
        assert float(out["state"][0]["step"]) == 2.0
    w = torch.nn.Parameter(torch.zeros(new_range[1] - new_range[0], 4))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9) if name == "sgd" else \
        torch.optim.Adam([w], lr=0.1)
    opt.load_state_dict(out)                    # loadable as is


def test_rng_state_roundtrip(tmp_path):
    """Through a file read with weights_only=True; numpy's gaussian cache survives too."""
    dev = torch.device("cpu")
    np.random.randn()                                   # has_gauss=1: a cached gaussian
    ckpt.check_pickle_free(ckpt.rng_state(dev))
    torch.save(ckpt.rng_state(dev), tmp_path / "rng.pt")
    a = (random.random(), np.random.randn(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_file(tmp_path / "rng.pt"), dev)
    assert (random.random(), np.random.randn(), np.random.rand(), torch.rand(1).item()) == a


def test_export_backbone_torch_and_onnx(tmp_path):
    import onnx

    from facetrain.eval.embed import load_backbone
    from facetrain.models.registry import build_backbone

    kwargs = {"embedding_size": 16, "dropout": 0.0, "image_size": 16}
    torch.manual_seed(0)
    model = build_backbone("tiny", **kwargs).eval()
    paths = export.export_backbone(model, "tiny", kwargs, tmp_path / "export", image_size=16)
    payload = export.check_exported(torch.load(paths["torch"], weights_only=True), paths["torch"])
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
        export.check_exported(torch.load(tmp_path / "other.pt", weights_only=True),
                              tmp_path / "other.pt")


class _Payload:
    """What a crafted file carries: unpickling it creates `marker` (any code could run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(path):
    """Record the current sizes and CRC-32s in meta.json, as a crafted checkpoint would."""
    meta = ckpt.read_meta(path)
    meta["digests"] = {n: ckpt.file_digest(path / n) for n in meta["files"]}
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("target", ["replicated.pt", "rank00000.pt"])
def test_crafted_checkpoint_runs_nothing_and_is_refused(tmp_path, target):
    root = tmp_path / "checkpoints"
    path = _save(root, 5)
    marker = tmp_path / "payload_ran"
    torch.save({"step": 5, "x": torch.tensor([5]), "extra": _Payload(marker)}, path / target)
    _reseal(path)
    assert ckpt.resolve_resume("auto", root) == path       # sizes and CRCs are valid
    loader = ckpt.load_replicated if target == "replicated.pt" else \
        (lambda p: ckpt.load_rank_file(p, 0))
    with pytest.raises(ckpt.CheckpointError) as info:
        loader(path)
    assert not marker.exists()
    msg = str(info.value)
    assert msg.startswith(f"{path / target}: refused, it holds a pickled object")
    assert "(global io.open)" in msg and "weights_only=True" in msg


def test_saving_refuses_objects_that_need_unpickling(tmp_path):
    class Stage(enum.IntEnum):
        TWO = 2

    with pytest.raises(ckpt.CheckpointError,
                       match=r"rank00000\.pt\['zero'\]\['stage'\] is a .*Stage; a checkpoint "
                             r"holds only tensors and plain values"):
        ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, {"zero": {"stage": Stage.TWO}},
                             single_process(), 2)
    with pytest.raises(ckpt.CheckpointError, match=r"\['rng'\]\[1\] is a numpy.ndarray"):
        ckpt.check_pickle_free({"rng": ("MT19937", np.zeros(3, np.uint32))}, "rank00000.pt")
    ckpt.check_pickle_free({"a": [1, 2.0, "s", None, True, (torch.zeros(2), torch.Size([2]))],
                            "b": OrderedDict(w=torch.ones(1)), "dtype": torch.float16})


def test_old_checkpoints_with_a_numpy_rng_key_still_load(tmp_path):
    """Checkpoints written before RNG states were tensors hold numpy's (kind, uint32 key, ...)
    tuple: that array, and only a uint32 one, is admitted; the streams resume exactly."""
    dev = torch.device("cpu")
    old = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    torch.save({"rng": old}, tmp_path / "old.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_file(tmp_path / "old.pt")["rng"], dev)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    for bad in (np.zeros(3), np.array([1, "a"], dtype=object)):   # float, object: refused
        torch.save({"rng": bad}, tmp_path / "bad.pt")
        with pytest.raises(ckpt.CheckpointError, match=r"bad\.pt: refused, .*\(an object of "
                                                       r"type numpy\.dtypes\.\w+DType\)"):
            ckpt.load_file(tmp_path / "bad.pt")


def _fail_on(monkeypatch, name_part, err=errno.ENOSPC):
    """torch.save raises OSError(err) for files whose name contains `name_part`, after
    writing a few bytes (a disk that fills up mid-file)."""
    real = torch.save

    def save(obj, f, *a, **k):
        if name_part in str(f):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(err, os.strerror(err))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("part", ["rank00000", "replicated"])
def test_disk_full_keeps_the_previous_checkpoint_and_removes_the_partial_one(
        tmp_path, monkeypatch, part):
    root = tmp_path / "checkpoints"
    prev = _save(root, 5)
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    _fail_on(monkeypatch, part)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(root, 10)
    name = "rank00000.pt" if part == "rank00000" else "replicated.pt"
    assert str(info.value).startswith(
        f"no space left writing {root / '.tmp_ckpt_step10' / name}; the checkpoint was "
        f"abandoned and its partial files removed, the previous checkpoint under {root} is kept")
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_step5", "latest"]
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    assert ckpt.resolve_resume("auto", root) == prev
    monkeypatch.undo()
    assert _save(root, 10).name == "ckpt_step10"           # space freed: the next save works


def test_disk_full_writing_meta_or_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    prev = _save(root, 5)
    real = ckpt._atomic_write_text

    for name in ("meta.json", "latest"):
        def write(path, text, name=name):
            if path.name == name:
                path.with_name(name + ".tmp").write_text("{")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, text)

        monkeypatch.setattr(ckpt, "_atomic_write_text", write)
        where = root / (".tmp_ckpt_step10/meta.json" if name == "meta.json" else "latest")
        with pytest.raises(ckpt.CheckpointError, match=f"^no space left writing {where};"):
            _save(root, 10)
        assert sorted(p.name for p in root.iterdir()) == ["ckpt_step5", "latest"]
        assert ckpt.resolve_resume("auto", root) == prev
    # Other write errors name the file and the reason the same way.
    monkeypatch.undo()
    _fail_on(monkeypatch, "rank00000", errno.EACCES)
    with pytest.raises(ckpt.CheckpointError, match=r"^could not write .*rank00000\.pt "
                                                   r"\(Permission denied\)"):
        _save(root, 10)
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_step5", "latest"]
