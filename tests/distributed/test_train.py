"""The trainer on 1 and 2 gloo processes: DDP gradients equal a single process on the same global
batch, gradient accumulation is invisible, the loss falls, a stopped-and-resumed run repeats the
uninterrupted loss sequence, checkpoints reshard 1->2 and 2->1, an fp16 overflow on one rank
skips the step everywhere (dense or sparse classifier gradient), sampled-row updates resume
exactly, and a NaN loss stops the run with the last good checkpoint kept. One spawn runs every 2-process scenario."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import run_spawn
from test_train_data import COUNTS, SIZE, make_tiny_rec, tiny_config
from facetrain import checkpoint as ckpt
from facetrain.dist import single_process
from facetrain.engines.ddp import DDPEngine
from facetrain.heads.partial_fc import PartialFC
from facetrain.logging_utils import read_metrics
from facetrain.models.registry import build_backbone
from facetrain.trainer import LossMonitor, NonFiniteLossError, Trainer


def _losses(out: Path) -> np.ndarray:
    m = read_metrics(Path(out) / "metrics.jsonl")
    return np.array([m[k]["loss"] for k in sorted(m)])


def _global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, SIZE, SIZE, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 11])
    return images, labels


def _one_step(cfg, ctx, chunks):
    """One optimizer step over `chunks` of (images, labels) micro-batches from a fixed init.
    The backbone is in eval mode: BatchNorm then uses running statistics, so a per-rank batch
    and the whole batch see the same function and only the gradient reduction is tested."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny", embedding_size=32, image_size=SIZE).eval()
    head = PartialFC(32, np.array(COUNTS), cfg.head, cfg.leap, ctx, seed=0)
    engine = DDPEngine(cfg, ctx, backbone, head)
    for k, (x, y) in enumerate(chunks):
        engine.micro_step(x, y, sync=k == len(chunks) - 1)
    engine.step()
    return backbone, head


def _assert_same_model(backbone, head, ref_backbone, ref_head):
    for (name, p), (_, q) in zip(backbone.state_dict().items(), ref_backbone.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(head.weight.detach(), ref_head.weight.detach()[head.start:head.end],
                               rtol=1e-4, atol=1e-5)


def _check_saved_shards_loaded(trainer: Trainer, src: Path) -> None:
    """After a resume on another world size, this rank holds the saved rows of its classes:
    classifier weights, LEAP centres and optimizer momentum."""
    shards = [ckpt.load_rank_file(src, r) for r in range(ckpt.read_meta(src)["world_size"])]
    a, b = trainer.head.start, trainer.head.end
    full_w = torch.cat([s["head"]["weight"] for s in shards])
    torch.testing.assert_close(trainer.head.weight.detach(), full_w[a:b])
    full_c = torch.cat([s["head"]["leap"]["centers"] for s in shards])
    torch.testing.assert_close(trainer.head.state_dict()["leap"]["centers"], full_c[a:b])
    full_m = torch.cat([s["head_optim"]["state"][0]["momentum_buffer"] for s in shards])
    mom = trainer.engine.head_opt.state_dict()["state"][0]["momentum_buffer"]
    torch.testing.assert_close(mom, full_m[a:b])


def _dist_scenarios(ctx, root: str, rec: str) -> None:
    root = Path(root)
    # 1) DDP + model-parallel head == one process on the same global batch of 8.
    cfg = tiny_config(rec, root / "eq", ["leap.mode=off", "optim.grad_clip=0", "optim.lr=0.5"])
    images, labels = _global_batch()
    ref = _one_step(cfg, single_process(), [(images, labels)])
    mine = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    _assert_same_model(*_one_step(cfg, ctx, [(images[mine], labels[mine])]), *ref)
    # 2) an uninterrupted run, and 3) the same run stopped at step 7 and resumed.
    Trainer(tiny_config(rec, root / "a"), ctx).fit()
    Trainer(tiny_config(rec, root / "b"), ctx).fit(stop_after=7)
    Trainer(tiny_config(rec, root / "b"), ctx).fit()
    # 4) resume the 1-process checkpoint on 2 processes (1 -> 2).
    src = ckpt.find_latest(root / "one" / "checkpoints")
    t = Trainer(tiny_config(rec, root / "c", [f"checkpoint.resume={src}"]), ctx)
    _check_saved_shards_loaded(t, src)
    assert t.step == 10 and t.batch == 10      # 10 batches of 8 = 10 global batches of 2 x 4
    t.fit(stop_after=t.step + 3)
    # 5) fp16: an overflow in ONE rank's classifier block skips the step on every rank, and
    #    the grad scalers stay equal (each scaler sees only its own shard otherwise); also with
    #    the sparse classifier gradient of head.update_rows=sampled.
    for extra in ([], ["head.sample_rate=0.5", "head.update_rows=sampled"]):
        cfg = tiny_config(rec, root / "fp16", ["train.precision=fp16", "leap.mode=off", *extra])
        torch.manual_seed(0)
        backbone = build_backbone("tiny", embedding_size=32, image_size=SIZE)
        head = PartialFC(32, np.array(COUNTS), cfg.head, cfg.leap, ctx, seed=0).train()
        engine = DDPEngine(cfg, ctx, backbone, head)
        engine.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)   # no genuine overflow
        before = head.weight.detach().clone()
        scale = engine.scaler.get_scale()
        engine.micro_step(images[mine], labels[mine], sync=True)
        assert head.weight.grad.is_sparse == bool(extra)
        if ctx.rank == 1:
            grad = head.weight.grad.coalesce() if extra else head.weight.grad
            (grad._values() if extra else grad)[0, 0] = float("inf")
            head.weight.grad = grad
        engine.step()
        assert engine.scaler.get_scale() == scale * 0.5
        assert torch.equal(head.weight.detach(), before)  # no rank stepped its classifier block
    # 6) head.update_rows=sampled: a 2-process run stopped and resumed repeats itself.
    sampled = ["head.sample_rate=0.5", "head.update_rows=sampled"]
    Trainer(tiny_config(rec, root / "s1", sampled), ctx).fit(stop_after=12)
    Trainer(tiny_config(rec, root / "s2", sampled), ctx).fit(stop_after=6)
    Trainer(tiny_config(rec, root / "s2", sampled), ctx).fit(stop_after=12)


def test_two_process_training_resume_and_reshard(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    one = single_process()
    # The 1-process source for the 1 -> 2 reshard (global batch 8, like 2 ranks x 4).
    Trainer(tiny_config(rec, tmp_path / "one", ["data.batch_size=8"]), one).fit(stop_after=10)
    run_spawn(_dist_scenarios, 2, str(tmp_path), rec)

    a = _losses(tmp_path / "a")
    assert len(a) == 3 * 15 and np.isfinite(a).all()
    assert a[-15:].mean() < 0.6 * a[:5].mean(), a              # the loss falls
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    last = rows[max(rows)]                                     # LEAP active from epoch 1
    assert last["leap_noise_var"] == pytest.approx(last["leap_target_noise_var"])
    assert last["leap_batch_noise_var"] > 0 and last["leap_mean_abs_alpha"] > 0
    b = _losses(tmp_path / "b")
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)     # resume equivalence
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()
    assert np.isfinite(_losses(tmp_path / "c")).all()
    s1 = _losses(tmp_path / "s1")
    assert len(s1) == 12 and np.isfinite(s1).all()
    np.testing.assert_allclose(_losses(tmp_path / "s2"), s1, rtol=1e-5, atol=1e-6)

    # 2 -> 1: the 2-process run's last checkpoint continues for one more epoch on 1 process.
    src = ckpt.find_latest(tmp_path / "a" / "checkpoints")
    assert ckpt.read_meta(src)["world_size"] == 2
    t = Trainer(tiny_config(rec, tmp_path / "d", [f"checkpoint.resume={src}", "train.epochs=4",
                                                  "data.batch_size=8"]), one)
    _check_saved_shards_loaded(t, src)
    assert (t.step, t.epoch) == (45, 3)
    t.fit(stop_after=48)
    assert np.isfinite(_losses(tmp_path / "d")).all()

    # Outputs of a finished run.
    out = tmp_path / "a"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "leap_stats_start.npz",
                 "leap_stats_end.npz", "export/backbone.pt", "export/backbone.onnx"):
        assert (out / name).is_file(), name
    stats = np.load(out / "leap_stats_end.npz")
    assert stats["var"].shape == (len(COUNTS),) and stats["valid"].all()
    np.testing.assert_array_equal(stats["class_counts"], COUNTS)
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 2       # keep_last


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    images, labels = _global_batch()
    base = ["leap.mode=off", "optim.grad_clip=0", "optim.lr=0.5"]
    one = single_process()
    ref = _one_step(tiny_config("unused", tmp_path, base), one, [(images, labels)])
    acc = _one_step(tiny_config("unused", tmp_path, base + ["optim.grad_accum=2"]), one,
                    [(images[:4], labels[:4]), (images[4:], labels[4:])])
    _assert_same_model(*acc, *ref)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "run"
    t = Trainer(tiny_config(rec, out, ["data.batch_size=8", "checkpoint.every_steps=2"]),
                single_process())
    real = t.engine.micro_step

    def poisoned(images, labels, sync):
        loss = real(images, labels, sync)
        return loss * float("nan") if t.step >= 4 else loss    # the 5th step goes bad

    t.engine.micro_step = poisoned
    with pytest.raises(NonFiniteLossError, match="non-finite .* at step 5"):
        t.fit()
    assert ckpt.find_latest(out / "checkpoints").name == "ckpt_step4"


def test_loss_monitor_patience():
    mon = LossMonitor(torch.device("cpu"), patience=3)     # fp16: the scaler gets a chance
    for step, v in enumerate([1.0, float("inf"), float("inf"), 2.0, float("nan")], 1):
        mon.update(torch.tensor(v), step)
    mon.check()                                             # 2 in a row < 3: keep going
    for step in range(6, 9):
        mon.update(torch.tensor(float("nan")), step)
    with pytest.raises(NonFiniteLossError, match="step 5 and stayed so for 4 steps"):
        mon.check()


def _make_pack(rec: str, path: Path, pairs: int = 20) -> str:
    """An LFW-style pack (pickle of (bins, issame)) from the tiny dataset's images."""
    import pickle

    from facetrain.data.dataset import RecordDataset

    ds = RecordDataset.open(rec)
    items = [ds.read(i) for i in range(len(ds))]
    by_class = {}
    for label, img in items:
        by_class.setdefault(label, []).append(img)
    rng = np.random.RandomState(0)
    bins, issame = [], []
    for i in range(pairs):
        a = int(rng.randint(len(COUNTS)))
        b = a if i % 2 == 0 else (a + 1) % len(COUNTS)
        bins += [by_class[a][0], by_class[b][1]]
        issame.append(a == b)
    with open(path, "wb") as fh:
        pickle.dump((bins, issame), fh)
    return str(path)


def test_mixed_precision_channels_last_and_verification_in_training(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    pack = _make_pack(rec, tmp_path / "pack.bin")
    out = tmp_path / "bf16"
    Trainer(tiny_config(rec, out, ["train.precision=bf16", "model.channels_last=true",
                                   "train.max_steps=6", f"eval.verification=[{pack}]",
                                   "eval.every_steps=3", "data.batch_size=8"]),
            single_process()).fit()
    log = (out / "log.txt").read_text()
    assert log.count("verification pack step") == 2        # steps 3 and 6 (the end)
    assert "pack_acc" in (out / "metrics.jsonl").read_text()
    assert np.isfinite(_losses(out)).all() and len(_losses(out)) == 6
    out = tmp_path / "fp16"                                  # GradScaler path (CPU autocast)
    t = Trainer(tiny_config(rec, out, ["train.precision=fp16", "train.max_steps=4",
                                       "data.batch_size=8"]), single_process())
    assert t.engine.scaler.is_enabled()
    t.fit()
    assert np.isfinite(_losses(out)).all() and len(_losses(out)) == 4
