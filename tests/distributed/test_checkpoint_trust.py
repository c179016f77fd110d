"""Checkpoints a user is handed run no code (those of the previous format still resume), and a
full disk on one rank of two abandons the checkpoint on every rank: a resume from a crafted
checkpoint with valid CRCs is refused naming the file (its payload never runs); a rank whose
write fails with ENOSPC makes every rank raise the same "no space left writing <path>", the
partial checkpoint is removed, and the previous one stays the one a resume takes."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import run_spawn
from test_train_data import make_tiny_rec, tiny_config
from facetrain import checkpoint as ckpt
from facetrain.dist import SetupFailedError, single_process
from facetrain.trainer import Trainer


class _Payload:
    """Unpickling this creates `marker` (a crafted file could run anything instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(path: Path) -> None:
    meta = ckpt.read_meta(path)
    meta["digests"] = {n: ckpt.file_digest(path / n) for n in meta["files"]}
    (path / "meta.json").write_text(json.dumps(meta))


def test_resume_from_a_crafted_checkpoint_runs_nothing(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "run"
    Trainer(tiny_config(rec, out), single_process()).fit(stop_after=5)
    path = ckpt.find_latest(out / "checkpoints")
    # A checkpoint of the previous format (numpy's RNG state as a pickled tuple with a uint32
    # array, the only non-plain value it held) still resumes, with the same numpy stream.
    shard = ckpt.load_rank_file(path, 0)
    new = shard["rng"]["numpy"]
    shard["rng"]["numpy"] = ("MT19937", new["key"].numpy().astype(np.uint32), new["pos"],
                             new["has_gauss"], new["gauss"])
    torch.save(shard, path / "rank00000.pt")
    _reseal(path)
    t = Trainer(tiny_config(rec, out), single_process())
    assert t.step == 5
    assert np.random.get_state()[1].tolist() == new["key"].tolist()
    t.log.close()
    # Keep every real entry (the file still looks right) and add the payload.
    state = ckpt.load_replicated(path)
    marker = tmp_path / "payload_ran"
    torch.save({**state, "note": _Payload(marker)}, path / "replicated.pt")
    _reseal(path)
    assert ckpt.verify_checkpoint(path) is None                   # sizes and CRCs match
    for resume in ("auto", str(path)):
        # Read in the checks before training: one report naming the file, no traceback.
        with pytest.raises(SetupFailedError) as info:
            Trainer(tiny_config(rec, out, [f"checkpoint.resume={resume}"]), single_process())
        assert isinstance(info.value.cause, ckpt.CheckpointError) and info.value.report
        assert str(info.value.cause).startswith(f"{path / 'replicated.pt'}: refused, it holds a "
                                          "pickled object that is not a tensor or plain value "
                                          "(global io.open)")
        assert not marker.exists()


def _rank1_disk_full(ctx, root: str) -> None:
    root = Path(root)
    ckpt.save_checkpoint(root, 5, {"step": 5} if ctx.is_main else None,
                         {"w": torch.full((3,), float(ctx.rank))}, ctx, keep_last=2)
    real = torch.save

    def save(obj, f, *a, **k):
        if ctx.rank == 1:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    torch.save = save
    try:
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.save_checkpoint(root, 10, {"step": 10} if ctx.is_main else None,
                                 {"w": torch.zeros(3)}, ctx, keep_last=2)
    finally:
        torch.save = real
    # Every rank raises rank 1's message (none waits for a peer that gave up).
    assert str(info.value).startswith(
        f"no space left writing {root / '.tmp_ckpt_step10' / 'rank00001.pt'}; the checkpoint "
        f"was abandoned and its partial files removed, the previous checkpoint under {root} "
        "is kept")
    if ctx.is_main:
        assert sorted(p.name for p in root.iterdir()) == ["ckpt_step5", "latest"]
        assert ckpt.resolve_resume("auto", root) == root / "ckpt_step5"
        assert ckpt.load_rank_file(root / "ckpt_step5", 1)["w"].tolist() == [1.0, 1.0, 1.0]


def test_disk_full_on_one_rank_abandons_the_checkpoint_everywhere(tmp_path):
    run_spawn(_rank1_disk_full, 2, str(tmp_path / "checkpoints"))
