"""Training throughput: the real facetrain step on synthetic on-device batches.

The step is the trainer's own: backbone (DDP when launched under torchrun) -> all-gather ->
sharded PartialFC (class sampling, LEAP, margin, distributed softmax CE) -> backward -> clip ->
both optimizers (facetrain.engines.DDPEngine). Only the loader is replaced by a few fixed
on-device batches, so the numbers compare one to one with the anchor table in RESULTS.md (InsightFace's
arcface_torch measured the same way: 8 warm-up steps, 30 timed).

    python benchmarks/train_throughput.py                       # CPU, tiny sizes (CI keeps it working)
    python benchmarks/train_throughput.py --device cuda         # the anchor table's rows
    python benchmarks/train_throughput.py --device cuda --rows r50-b256-c93k --precision fp16
    torchrun --nproc_per_node=8 benchmarks/train_throughput.py --device cuda   # scaling

Prints one table (samples/s over the whole job, peak GPU memory of rank 0) and writes JSON with
--json. `--split` adds a CUDA-event split of one step into forward / backward / optimizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

# classifier_bench is the sibling script: its folder is on the path when this file runs
from classifier_bench import HEADS, ROWS_REF, _loadavg, _peak_gib, _sync
from classifier_bench import _ratios as _pct_spread
from facetrain.config import config_from_dict
from facetrain.dist import DistContext, finish, init_distributed
from facetrain.engines import build_engine
from facetrain.heads.partial_fc import PartialFC
from facetrain.models.registry import build_backbone

# name -> (backbone, batch per rank, classes, sample_rate, image side, leap[, head.update_rows])
# Rows ending in -rows update only the sampled classifier rows (head.update_rows=sampled).
GPU_ROWS: Dict[str, tuple] = {
    "r50-b128-c93k": ("iresnet50", 128, 93_431, 1.0, 112, "off"),
    "r50-b256-c93k": ("iresnet50", 256, 93_431, 1.0, 112, "off"),
    "r50-b256-c93k-leap": ("iresnet50", 256, 93_431, 1.0, 112, "full"),
    "r50-b256-c2m-sr0.1": ("iresnet50", 256, 2_000_000, 0.1, 112, "off"),
    "r50-b256-c2m-sr0.1-leap": ("iresnet50", 256, 2_000_000, 0.1, 112, "full"),
    "r50-b256-c2m-sr0.1-rows": ("iresnet50", 256, 2_000_000, 0.1, 112, "off", "sampled"),
    "r50-b256-c2m-sr0.1-rows-leap": ("iresnet50", 256, 2_000_000, 0.1, 112, "full", "sampled"),
    "r50-b256-c2m": ("iresnet50", 256, 2_000_000, 1.0, 112, "off"),
    "r50-b256-c2m-leap": ("iresnet50", 256, 2_000_000, 1.0, 112, "full"),
}
CPU_ROWS: Dict[str, tuple] = {
    "tiny-b64-c2k": ("tiny", 64, 2_000, 1.0, 32, "off"),
    "tiny-b64-c2k-leap": ("tiny", 64, 2_000, 1.0, 32, "full"),
    "tiny-b64-c20k-sr0.1": ("tiny", 64, 20_000, 0.1, 32, "off"),
    "tiny-b64-c20k-sr0.1-leap": ("tiny", 64, 20_000, 0.1, 32, "full"),
    "tiny-b64-c20k-sr0.1-rows-leap": ("tiny", 64, 20_000, 0.1, 32, "full", "sampled"),
    # The classifier-bound CPU proxy of the 2M x sr0.1 row: many classes, a tiny backbone.
    "tiny-b64-c1m-sr0.1": ("tiny", 64, 1_000_000, 0.1, 32, "off"),
    "tiny-b64-c1m-sr0.1-rows": ("tiny", 64, 1_000_000, 0.1, 32, "off", "sampled"),
}


@dataclass
class Result:
    row: str
    backbone: str
    batch_per_rank: int
    world_size: int
    classes: int
    sample_rate: float
    leap: str
    update_rows: str
    precision: str
    compile: bool
    channels_last: bool
    samples_per_s: float
    ms_per_step: float
    peak_mem_gib: float
    split_ms: Optional[Dict[str, float]] = None
    error: Optional[str] = None
    head: str = "arcface"
    vs_cosface_pct: Optional[float] = None
    vs_cosface_min_pct: Optional[float] = None       # --heads: spread of the per-round ratio
    vs_cosface_max_pct: Optional[float] = None
    cpu_ms_per_step: Optional[float] = None           # --heads: process CPU time per step
    cpu_vs_cosface_pct: Optional[float] = None
    best_vs_cosface_pct: Optional[float] = None       # best CPU-time round vs CosFace's best
    ms_rounds: Optional[List[float]] = None           # --heads: every round, wall and CPU
    cpu_ms_rounds: Optional[List[float]] = None



def synthetic_counts(classes: int, seed: int = 0) -> np.ndarray:
    """Long-tailed K_i: a quarter of the classes are head (50-150 images), the rest tail (2-8),
    so LEAP's statistics have head and tail classes to work with."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 9, size=classes)
    head = rng.random(classes) < 0.25
    counts[head] = rng.integers(50, 151, size=int(head.sum()))
    return counts.astype(np.int64)


def build_cfg(backbone: str, batch: int, sample_rate: float, side: int, leap: str,
              args: argparse.Namespace, update_rows: str = "all", head: str = "arcface"):
    # arcface: s=64, m=0.5, the anchor table's head; ROWS_REF: CosFace (with K x the classes).
    margin, extra = HEADS["cosface" if head == ROWS_REF else head]
    return config_from_dict({
        "data": {"batch_size": batch, "image_size": side},
        "model": {"backbone": backbone, "channels_last": args.channels_last,
                  "compile": args.compile},
        "head": {"sample_rate": sample_rate, "update_rows": update_rows,
                 "margin": asdict(margin), **extra},
        "leap": {"mode": leap, "update_interval": 5, "start_epoch": 0},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "grad_clip": 5.0},
        "train": {"precision": args.precision, "device": args.device},
    })


def run_row(name: str, spec: tuple, args: argparse.Namespace, ctx: DistContext,
            head_name: str = "arcface") -> Result:
    step, result = build_row(name, spec, args, ctx, head_name)
    dev = ctx.device
    for _ in range(args.warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    res = result(1000 * dt / args.steps)
    if args.split and dev.type == "cuda":
        res.split_ms = _split(step.engine, step.images[0], step.labels[0], dev)
    del step
    return res


def build_row(name: str, spec: tuple, args: argparse.Namespace, ctx: DistContext,
              head_name: str = "arcface"):
    """(step, result): `step()` runs one training step of the row (backbone, engine and fixed
    batches built here); `result(ms_per_step)` is its Result with that time."""
    backbone_name, batch, classes, rate, side, leap = spec[:6]
    if head_name == ROWS_REF:             # as many classifier rows as sub-center ArcFace's
        classes *= HEADS["subcenter"][0].subcenters
    update_rows = spec[6] if len(spec) > 6 else "all"
    cfg = build_cfg(backbone_name, batch, rate, side, leap, args, update_rows, head_name)
    dev = ctx.device
    torch.manual_seed(ctx.rank)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    backbone = build_backbone(backbone_name, embedding_size=512, dropout=0.0,
                              image_size=side).to(dev)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if args.compile:
        backbone = torch.compile(backbone)
    head = PartialFC(512, synthetic_counts(classes), cfg.head, cfg.leap, ctx, seed=0).to(dev)
    engine = build_engine(cfg, ctx, backbone, head)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = [torch.randn(batch, 3, side, side, device=dev).contiguous(memory_format=fmt)
              for _ in range(4)]
    gen = torch.Generator(device="cpu").manual_seed(ctx.rank)
    labels = [torch.randint(0, classes, (batch,), generator=gen).to(dev) for _ in range(4)]
    i = [0]

    def step() -> None:
        k = i[0] % 4
        i[0] += 1
        engine.micro_step(images[k], labels[k], sync=True)
        engine.step()

    step.engine, step.images, step.labels = engine, images, labels

    def result(ms: float) -> Result:
        return Result(name, backbone_name, batch, ctx.world_size, classes, rate, leap,
                      update_rows, args.precision, args.compile, args.channels_last,
                      samples_per_s=batch * ctx.world_size * 1000 / ms, ms_per_step=ms,
                      peak_mem_gib=_peak_gib(dev), head=head_name)

    return step, result


def _split(engine, images: torch.Tensor, labels: torch.Tensor, dev: torch.device) -> Dict[str, float]:
    """One step timed in three parts with CUDA events (forward, backward, optimizer)."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    ev[0].record()
    with engine.autocast():
        loss = engine.head(engine.model(images), labels)
    ev[1].record()
    engine.scaler.scale(loss).backward()
    ev[2].record()
    engine.step()
    ev[3].record()
    torch.cuda.synchronize(dev)
    return {"forward": ev[0].elapsed_time(ev[1]), "backward": ev[1].elapsed_time(ev[2]),
            "optimizer": ev[2].elapsed_time(ev[3])}


def format_table(results: List[Result]) -> str:
    head = (f"{'row':<26} {'prec':<5} {'cmp':<3} {'ws':>2} {'samples/s':>10} {'ms/step':>8} "
            f"{'peak GiB':>8}  split f/b/o ms")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.row:<26} ERROR {r.error}")
            continue
        split = "" if not r.split_ms else "/".join(f"{r.split_ms[k]:.1f}" for k in
                                                    ("forward", "backward", "optimizer"))
        lines.append(f"{r.row:<26} {r.precision:<5} {'y' if r.compile else 'n':<3} "
                     f"{r.world_size:>2} {r.samples_per_s:>10.1f} {r.ms_per_step:>8.1f} "
                     f"{r.peak_mem_gib:>8.2f}  {split}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu runs tiny sizes; cuda runs the anchor table's rows")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all of the device's)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--channels-last", action="store_true", help="channels_last backbone and images")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--split", action="store_true", help="CUDA-event split of one extra step")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--heads", default="", help="comma-separated margin heads (classifier_bench's "
                   "HEADS, docs/heads.md) to time each row with, against CosFace, in "
                   "interleaved rounds; the median is reported")
    p.add_argument("--rounds", type=int, default=3, help="--heads / --config: timing rounds "
                   "(--heads: --warmup steps per head once, then --steps per head per round)")
    p.add_argument("--config", default=None,
                   help="time this training config with LEAP off against LEAP on (its mode, "
                        "or full), interleaved; e.g. configs/default.yaml (the main job)")
    p.add_argument("--set", nargs="*", default=[], help="--config overrides, section.key=value")
    p.add_argument("--classes", type=int, default=2000, help="--config: synthetic class count")
    p.add_argument("--plain", action="store_true",
                   help="--config: also time a plain PyTorch loop (same backbone, a cosine "
                        "classifier with the config's CosFace/ArcFace margin, cross-entropy, "
                        "SGD) against facetrain with LEAP off plus the trainer's per-step work")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv: Optional[List[str]] = None) -> List[Result]:
    args = parse_args(argv)
    table = GPU_ROWS if args.device == "cuda" else CPU_ROWS
    names = [n for n in args.rows.split(",") if n] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; known for {args.device}: {', '.join(table)}")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = init_distributed(args.device)
    if args.config:
        return _leap_ab(args, ctx)
    if args.heads:
        return _main_heads(args, names, table, ctx)
    results = []
    for name in names:
        try:
            res = run_row(name, table[name], args, ctx)
        except torch.OutOfMemoryError as exc:      # keep going: one row must not lose the others
            res = Result(name, *table[name][:1], 0, ctx.world_size, 0, 0.0, "", "", args.precision,
                         args.compile, args.channels_last, 0.0, 0.0, 0.0, error=repr(exc)[:200])
        if ctx.is_main:
            print(json.dumps(asdict(res)), flush=True)
        results.append(res)
    if ctx.is_main:
        print(format_table(results))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    finish(ctx)
    return results


def _leap_ab(args: argparse.Namespace, ctx: DistContext) -> Dict[str, float]:
    """LEAP off against LEAP on for any config (--config, overrides in --set): both engines
    built once from that config (synthetic long-tailed class counts, --classes), LEAP started at
    epoch 0 and warmed up until its statistics perturb the tail; then rounds of --steps steps
    alternate which side runs first. Prints best / median ms per step and the ratio."""
    from facetrain.config import load_config
    base = load_config(args.config, args.set)
    sides = {}
    for name, mode in (("off", "off"), ("leap", base.leap.mode if base.leap.mode != "off"
                                         else "full")):
        cfg = dataclasses.replace(base, leap=dataclasses.replace(base.leap, mode=mode,
                                                                 start_epoch=0))
        torch.manual_seed(0)
        side = cfg.data.image_size
        backbone = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                                  dropout=0.0, image_size=side).to(ctx.device)
        head = PartialFC(cfg.model.embedding_size, synthetic_counts(args.classes), cfg.head,
                         cfg.leap, ctx, seed=cfg.train.seed).to(ctx.device)
        engine = build_engine(cfg, ctx, backbone, head)
        b = cfg.data.batch_size
        gen = torch.Generator().manual_seed(ctx.rank)
        batches = [(torch.randn(b, 3, side, side, generator=gen).to(ctx.device),
                    torch.randint(0, args.classes, (b,), generator=gen).to(ctx.device))
                   for _ in range(4)]
        sides[name] = (engine, head, batches, [0])

    names = ["off", "leap"] + (["plain"] if args.plain else [])
    if args.plain:
        sides["plain"] = _plain_side(base, ctx, args.classes, sides["off"][2])
        sides["off"] = sides["off"] + (_trainer_extras(base, sides["off"][0], ctx),)
    cpu_ms: Dict[str, List[float]] = {k: [] for k in names}

    def run(name: str, n: int) -> float:
        """Wall ms per step; also records this process's CPU ms per step, which a machine
        shared with other jobs disturbs less (1 thread: CPU time = the step's own work)."""
        engine, _, batches, i = sides[name][:4]
        extras = sides[name][4] if len(sides[name]) > 4 else None
        _sync(ctx.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            x, y = batches[i[0] % 4]
            i[0] += 1
            if extras is not None:
                extras.before(i[0])
            loss = engine.micro_step(x, y, sync=True)
            engine.step()
            if extras is not None:
                extras.after(loss, i[0])
        _sync(ctx.device)
        cpu_ms[name].append(1000 * (time.process_time() - c0) / n)
        return 1000 * (time.perf_counter() - t0) / n

    for name in sides:
        run(name, args.warmup)
        cpu_ms[name].clear()
    head = sides["leap"][1]
    perturbed = int((head.leap.class_std > 0).sum()) if head.leap is not None else 0
    ms: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ms[name].append(run(name, args.steps))
    out = {"perturbed_classes": perturbed, "classes": args.classes,
           "batch": sides["off"][2][0][1].numel(), "threads": torch.get_num_threads()}
    for name in ms:
        out[f"{name}_best_ms"] = min(ms[name])
        out[f"{name}_median_ms"] = float(np.median(ms[name]))
    out["ratio_best"] = out["off_best_ms"] / out["leap_best_ms"]          # LEAP / off speed
    out["ratio_median"] = float(np.median([a / b for a, b in zip(ms["off"], ms["leap"])]))
    out["cpu_off_best_ms"], out["cpu_leap_best_ms"] = min(cpu_ms["off"]), min(cpu_ms["leap"])
    out["cpu_ratio_best"] = out["cpu_off_best_ms"] / out["cpu_leap_best_ms"]
    out["cpu_ratio_median"] = float(np.median([a / b for a, b in zip(cpu_ms["off"],
                                                                     cpu_ms["leap"])]))
    if args.plain:
        out["plain_best_ms"] = min(ms["plain"])
        out["plain_median_ms"] = float(np.median(ms["plain"]))
        out["off_vs_plain_best"] = out["plain_best_ms"] / out["off_best_ms"]
        out["off_vs_plain_median"] = float(np.median([a / b for a, b in zip(ms["plain"],
                                                                            ms["off"])]))
        out["cpu_plain_best_ms"] = min(cpu_ms["plain"])
        out["cpu_off_vs_plain_best"] = out["cpu_plain_best_ms"] / out["cpu_off_best_ms"]
        out["cpu_off_vs_plain_median"] = float(np.median([a / b for a, b in zip(
            cpu_ms["plain"], cpu_ms["off"])]))
        if ctx.is_main:
            print(f"facetrain LEAP off at {out['off_vs_plain_best']:.3f} (best) / "
                  f"{out['off_vs_plain_median']:.3f} (median of rounds) of the plain loop in "
                  f"wall time, {out['cpu_off_vs_plain_best']:.3f} / "
                  f"{out['cpu_off_vs_plain_median']:.3f} in CPU time", flush=True)
    if ctx.is_main:
        print(json.dumps(out), flush=True)
        print(f"LEAP {sides['leap'][1].leap_cfg.mode} at {out['ratio_best']:.3f} (best) / "
              f"{out['ratio_median']:.3f} (median of rounds) of LEAP off in wall time, "
              f"{out['cpu_ratio_best']:.3f} / {out['cpu_ratio_median']:.3f} in CPU time; "
              f"{perturbed} of "
              f"{args.classes} classes perturbed")
    finish(ctx)
    return out


class _TrainerExtras:
    """What `Trainer._run_epoch` adds around each engine step: the LR schedule and the on-device
    loss monitor (its host sync happens only every train.log_every steps, also here)."""

    def __init__(self, cfg, engine, ctx: DistContext) -> None:
        from facetrain.optim import LRSchedule
        from facetrain.trainer import LossMonitor
        self.cfg, self.engine = cfg, engine
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, 1000, 10**6)
        self.monitor = LossMonitor(ctx.device, 1)

    def before(self, step: int) -> None:
        self.schedule.apply(self.engine.optimizers, step,
                            scales=(self.cfg.optim.backbone_lr_scale, 1.0))

    def after(self, loss: torch.Tensor, step: int) -> None:
        step_loss = torch.zeros((), device=loss.device) + loss
        self.monitor.update(step_loss / 1, step)
        if step % self.cfg.train.log_every == 0:
            self.monitor.check()
            self.monitor.mean_and_reset()


def _trainer_extras(cfg, engine, ctx: DistContext) -> _TrainerExtras:
    return _TrainerExtras(cfg, engine, ctx)


class _PlainLoop:
    """A plain PyTorch training step with the same backbone and loss as the config: normalised
    embeddings against normalised class weights, the margin on the target logit (CosFace
    cos - m_cos; ArcFace cos(theta + m_arc)), scale, cross-entropy, backbone gradient clipping,
    one SGD with the config's momentum and weight decay. No sharding, no sampling, no LEAP."""

    def __init__(self, cfg, ctx: DistContext, classes: int) -> None:
        torch.manual_seed(0)
        side = cfg.data.image_size
        self.backbone = build_backbone(cfg.model.backbone,
                                       embedding_size=cfg.model.embedding_size, dropout=0.0,
                                       image_size=side).to(ctx.device)
        self.weight = torch.nn.Parameter(
            torch.randn(classes, cfg.model.embedding_size, device=ctx.device) * 0.01)
        o = cfg.optim
        self.opt = torch.optim.SGD([{"params": self.backbone.parameters()},
                                    {"params": [self.weight]}], lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        self.m = cfg.head.margin
        self.clip = o.grad_clip
        self.optimizers = [self.opt]

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool = True) -> torch.Tensor:
        import torch.nn.functional as F
        cos = F.linear(F.normalize(self.backbone(x)), F.normalize(self.weight))
        rows = torch.arange(y.numel(), device=y.device)
        target = cos[rows, y]
        if self.m.m_arc:
            target = torch.cos(torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7)) + self.m.m_arc)
        logits = cos.index_put((rows, y), target - self.m.m_cos) * self.m.scale
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach()

    def step(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _plain_side(cfg, ctx: DistContext, classes: int, batches) -> tuple:
    return (_PlainLoop(cfg, ctx, classes), None, batches, [0])


def _main_heads(args, names: List[str], table: Dict[str, tuple], ctx: DistContext) -> List[Result]:
    """Each row with CosFace and every head of --heads: every head's step is built once, warmed
    up, then timed in --rounds interleaved rounds of --steps steps whose order rotates (a
    drifting machine moves both sides of each ratio alike). Reports the median ms/step, and
    min / median / max of the per-round ratio to CosFace in wall time, plus the median ratio in
    process CPU time (with one thread the step's own work)."""
    heads = ["cosface"] + [h for h in args.heads.split(",") if h and h != "cosface"]
    if "all" in heads:
        heads = list(HEADS)
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise SystemExit(f"unknown head(s) {unknown}; known: {', '.join(HEADS)}")
    if "subcenter" in heads:              # its same-size reference (classifier_bench.ROWS_REF)
        heads.append(ROWS_REF)
    results = []
    for name in names:
        built = {h: build_row(name, table[name], args, ctx, h) for h in heads}
        for h in heads:
            for _ in range(args.warmup):
                built[h][0]()
        if ctx.is_main:
            print(f"# {name}: {torch.get_num_threads()} thread(s), load average before "
                  f"{_loadavg()}", flush=True)
            print("| row | head | precision | ms/step (median) | vs CosFace, wall: min / median / "
                  "max | vs CosFace, CPU time: median / best |", flush=True)
        wall: Dict[str, List[float]] = {h: [] for h in heads}
        cpu: Dict[str, List[float]] = {h: [] for h in heads}
        for r in range(args.rounds):
            for h in heads[r % len(heads):] + heads[:r % len(heads)]:   # no head always first
                step = built[h][0]
                _sync(ctx.device)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    step()
                _sync(ctx.device)
                wall[h].append(1000 * (time.perf_counter() - t0) / args.steps)
                cpu[h].append(1000 * (time.process_time() - c0) / args.steps)
        for h in heads:
            res = built[h][1](float(np.median(wall[h])))
            res.cpu_ms_per_step = float(np.median(cpu[h]))
            res.ms_rounds, res.cpu_ms_rounds = wall[h], cpu[h]
            if h != "cosface":
                spread = _pct_spread(wall[h], wall["cosface"])
                res.vs_cosface_min_pct, res.vs_cosface_pct, res.vs_cosface_max_pct = spread
                res.cpu_vs_cosface_pct = _pct_spread(cpu[h], cpu["cosface"])[1]
                # Other jobs only add time: the best rounds are the least disturbed.
                res.best_vs_cosface_pct = 100 * (min(cpu[h]) - min(cpu["cosface"])) / min(
                    cpu["cosface"])
            results.append(res)
            if ctx.is_main:
                over = "" if res.vs_cosface_pct is None else (
                    f"{res.vs_cosface_min_pct:+.1f}% / {res.vs_cosface_pct:+.1f}% / "
                    f"{res.vs_cosface_max_pct:+.1f}% | {res.cpu_vs_cosface_pct:+.1f}% / "
                    f"{res.best_vs_cosface_pct:+.1f}%")
                print(f"| {name} | {h} | {res.precision} | {res.ms_per_step:.1f} | {over} |",
                      flush=True)
        if ctx.is_main:
            print(f"# load average after {_loadavg()}", flush=True)
        del built
    if ctx.is_main and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    finish(ctx)
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
