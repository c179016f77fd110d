"""The DeepSpeed engine on CPU/gloo: ZeRO-1 gives the DDP engine's loss sequence (fp32, up to
rounding) and resumes with the same losses; bf16 and fp16 train; a ZeRO-2 checkpoint from 2 ranks resumes
on 1 rank (classifier and ZeRO partitions re-split). The runs share processes (`run_spawn`, what torchrun would
start) because importing DeepSpeed costs seconds per process; the launcher's own path is
covered by tests/e2e/test_launch.py."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from _helpers import gloo_threads, run_spawn  # noqa: E402
from test_train_data import make_tiny_rec, tiny_config  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from facetrain.config import ConfigError  # noqa: E402
from facetrain.dist import SetupFailedError  # noqa: E402
from facetrain.engines import deepspeed_engine  # noqa: E402
from facetrain.logging_utils import read_metrics  # noqa: E402
from facetrain.trainer import Trainer  # noqa: E402

# What this CPU's oneDNN can do decides which mixed precisions DeepSpeed takes (AMD EPYC: bf16
# only; many Intel CPUs: both). Every supported one is trained; fp16 is covered where it exists.
MIXED = [p for p in deepspeed_engine.supported_precisions(torch.device("cpu")) if p != "fp32"]


def _losses(out: Path) -> np.ndarray:
    m = read_metrics(out / "metrics.jsonl")
    return np.array([m[k]["loss"] for k in sorted(m)])


def _train(ctx, rec, out, extra, stop_after=None):
    # torchrun's variables, which DeepSpeed reads besides the existing process group.
    os.environ.update(RANK=str(ctx.rank), WORLD_SIZE=str(ctx.world_size),
                      LOCAL_RANK=str(ctx.rank), LOCAL_SIZE=str(ctx.world_size), DS_BUILD_OPS="0")
    cfg = tiny_config(rec, Path(out), ["checkpoint.every_steps=2", "train.max_steps=8", *extra])
    Trainer(cfg, ctx).fit(stop_after=stop_after)


def _unsupported_precision_is_a_config_error(ctx, rec, out) -> None:
    real = deepspeed_engine.supported_precisions
    deepspeed_engine.supported_precisions = lambda device: ["fp32", "bf16"]   # an fp16-less CPU
    try:
        # Found before the first collective and agreed by every rank; rank 0 reports it.
        with pytest.raises(SetupFailedError) as info:
            _train(ctx, rec, out, ["train.engine=deepspeed", "train.precision=fp16"])
        assert info.value.report == (ctx.rank == 0)
        if ctx.rank == 0:
            assert isinstance(info.value.cause, ConfigError)
            assert re.search(r"train.precision=fp16 is not supported by DeepSpeed on this "
                             r"machine .*supported here: fp32, bf16", str(info.value.cause))
    finally:
        deepspeed_engine.supported_precisions = real


def _comm_loops() -> int:
    """gloo's network threads in this process: one per live gloo process group that has
    connected to a peer."""
    return gloo_threads().count("gloo_tcp_loop")


def _nothing_of_deepspeed_left(ctx, loops_before: int) -> None:
    """After the runs, only the caller's group lives: every group DeepSpeed made was destroyed
    and its threads joined while the interpreter is whole (a group left to interpreter
    finalization aborted the process now and then: "terminate called without an active
    exception")."""
    import torch.distributed.distributed_c10d as c10d

    assert deepspeed_engine._deepspeed_groups(exclude=ctx.group) == []
    assert list(c10d._world.pg_map) == [ctx.group]
    # The caller's group may start its network thread lazily (1 rank): at most that one.
    assert _comm_loops() <= max(loops_before, 1)


def _two_ranks(ctx, root: str, rec: str) -> None:
    root = Path(root)
    loops_before = _comm_loops()
    _unsupported_precision_is_a_config_error(ctx, rec, root / "unsupported")
    _train(ctx, rec, root / "ddp", [])
    z1 = ["train.engine=deepspeed", "train.zero_stage=1"]
    _train(ctx, rec, root / "z1_full", z1)
    _train(ctx, rec, root / "z1", z1, stop_after=4)
    _train(ctx, rec, root / "z1", z1)                        # resumes at step 4
    _train(ctx, rec, root / "z2", ["train.engine=deepspeed", "train.zero_stage=2"], stop_after=4)
    for precision in MIXED:                    # DeepSpeed's own mixed precision (module cast)
        _train(ctx, rec, root / precision, ["train.engine=deepspeed", "train.zero_stage=2",
                                            f"train.precision={precision}",
                                            "train.max_steps=4"])
    # Sampled-row classifier updates (sparse gradient) under DeepSpeed's fp16 loss scale where
    # the CPU has fp16, else under bf16.
    _train(ctx, rec, root / "rows", ["train.engine=deepspeed", "train.zero_stage=2",
                                     f"train.precision={MIXED[-1]}", "head.sample_rate=0.5",
                                     "head.update_rows=sampled", "train.max_steps=4"])
    _nothing_of_deepspeed_left(ctx, loops_before)


def _one_rank(ctx, root: str, rec: str) -> None:
    loops_before = _comm_loops()
    _train(ctx, rec, Path(root) / "z2", ["train.engine=deepspeed", "train.zero_stage=2",
                                         "data.batch_size=8", "train.max_steps=6"])
    _nothing_of_deepspeed_left(ctx, loops_before)


def test_deepspeed_zero1_matches_ddp_and_resumes_zero2_reshards(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    run_spawn(_two_ranks, 2, str(tmp_path), rec)
    ref = _losses(tmp_path / "ddp")
    z1 = _losses(tmp_path / "z1")
    assert len(ref) == 8 and "resumed from" in (tmp_path / "z1" / "log.txt").read_text()
    assert "engine deepspeed" in (tmp_path / "z1" / "log.txt").read_text()
    full = _losses(tmp_path / "z1_full")
    np.testing.assert_allclose(z1, full, rtol=1e-5, atol=1e-5)         # resume equivalence
    # ZeRO sums flattened fp32 partitions in another order than DDP's buckets: equal to
    # rounding at first; the rounding then grows over steps on this tiny, noisy problem.
    np.testing.assert_allclose(full[:4], ref[:4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full, ref, rtol=2e-2)
    assert "bf16" in MIXED                     # DeepSpeed's CPU accelerator always takes bf16
    for precision in MIXED:
        # A smoke test: the same first loss as fp32 up to rounding, then the same trend.
        got = _losses(tmp_path / precision)
        np.testing.assert_allclose(got[0], ref[0], rtol=0.01)
        np.testing.assert_allclose(got, ref[:4], rtol=0.25)
    rows = _losses(tmp_path / "rows")
    assert len(rows) == 4 and np.isfinite(rows).all() and rows[-1] < rows[0]
    run_spawn(_one_rank, 1, str(tmp_path), rec)
    log = (tmp_path / "z2" / "log.txt").read_text()
    assert "saved by 2 ranks, now 1" in log and "done: step 6" in log
    z2 = _losses(tmp_path / "z2")
    assert len(z2) == 6 and np.isfinite(z2).all()
    np.testing.assert_allclose(z2[:4], ref[:4], rtol=1e-4, atol=1e-4)


def test_zero_state_is_stored_pickle_free(tmp_path):
    """DeepSpeed's ZeRO partition state holds its loss scaler object, a stage enum and
    fragment-address dataclasses: stored as plain values they load with weights_only=True, and
    the dynamic loss scale (scale, counters) comes back on this run's scaler."""
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from facetrain import checkpoint as ckpt

    def scaler():
        return DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1,
                                 delayed_shift=2, consecutive_hysteresis=False,
                                 dtype=torch.float16)

    saved = scaler()
    saved.cur_scale, saved.cur_iter, saved.last_overflow_iter, saved.cur_hysteresis = \
        1024.0, 37, 30, 1
    sd = {"loss_scaler": saved, "dynamic_loss_scale": True, "overflow": False,
          "zero_stage": ZeroStageEnum.gradients, "ds_version": "0.19.8",
          "base_optimizer_state": [{"momentum_buffer": torch.ones(4)}],
          "single_partition_of_fp32_groups": [torch.arange(4.0)],
          "param_slice_mappings": [OrderedDict(w=fragment_address(numel=4, start=0))]}
    with pytest.raises(ckpt.CheckpointError, match=r"\['loss_scaler'\] is a deepspeed"):
        ckpt.check_pickle_free(sd, "rank00000.pt")
    torch.save(deepspeed_engine.plain_zero_state(sd), tmp_path / "z.pt")
    back = ckpt.load_file(tmp_path / "z.pt")
    assert back["zero_stage"] == 2 and type(back["zero_stage"]) is int
    assert back["param_slice_mappings"] == [{"w": {"numel": 4, "start": 0}}]
    assert "loss_scaler" not in back                 # DeepSpeed keeps this run's scaler object
    fresh = scaler()
    deepspeed_engine.restore_loss_scaler(fresh, back[deepspeed_engine.SCALER_STATE])
    assert vars(fresh) == vars(saved)
    # A shard written before (DeepSpeed's objects pickled as they are) is refused by name.
    torch.save({"zero_optim": sd}, tmp_path / "rank00000.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rank00000\.pt: refused, .*\(global deepspeed"
                                                   r"\..*\).*resume them with the facetrain "
                                                   r"that wrote them, or start fresh"):
        ckpt.load_file(tmp_path / "rank00000.pt")
