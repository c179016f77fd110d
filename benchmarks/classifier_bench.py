"""Classifier alone (PartialFC + margin + LEAP + distributed softmax CE): forward + backward.

One process, the whole class range on one device (the model-parallel shard of a 1-GPU run), a
synthetic on-device batch of embeddings, no backbone and no optimizer. LEAP "on" is the full
mode with per-logit angles, with statistics warmed up first so that most tail rows are
perturbed (the cost of the block pass does not depend on how many rows are).

    python benchmarks/classifier_bench.py                     # CPU: 9,343 and 20,000 classes
    python benchmarks/classifier_bench.py --device cuda       # 93,431 and 2,000,000 classes
    python benchmarks/classifier_bench.py --heads all --classes 100000 --sample-rates 0.1

--heads times the margin kinds and logit-level options (docs/heads.md) instead of ArcFace alone,
each against CosFace at the same class count, sample rate and LEAP setting, in interleaved rounds
in one process (`--rounds`; the order rotates each round). Every head's weight is a view of one
shared draw (the values each would draw itself), so 1M classes x 12 heads fit in memory. With
`subcenter` a CosFace head with K times the classes (`cosface_rows`: the same number of weight
rows, so the same GEMM) is timed too: subcenter's `vs rows` column is what it adds beyond its
inherent K-times larger classifier. The tables give min / median / max of the per-round ratios,
in wall and in process CPU time (with one thread the step's own work, which other jobs on a
shared machine disturb less), and the load average before and after.

    python benchmarks/classifier_bench.py --heads all --classes 1000000 --sample-rates 0.1 \
        --leap off --threads 1 --rounds 9 --steps 2 --warmup 1

Peak memory: on CUDA the allocator's peak over the timed steps of that row; on CPU the process's
peak resident set so far (monotone over rows; includes Python and torch themselves).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from facetrain.config import HeadConfig, LeapConfig, MarginConfig  # noqa: E402
from facetrain.dist import single_process  # noqa: E402
from facetrain.heads import partial_fc as _pfc  # noqa: E402
from facetrain.heads.partial_fc import PartialFC  # noqa: E402

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MARGIN = MarginConfig("arcface", 64.0, 0.0, 0.5)
# --heads: name -> (margin, other head fields), the published settings of each (docs/heads.md).
HEADS = {
    "cosface": (MarginConfig("cosface", 64.0, 0.35, 0.0), {}),
    "arcface": (_MARGIN, {}),
    "elasticface_arc": (MarginConfig("elasticface_arc", 64.0, 0.0, 0.5, sigma=0.05), {}),
    "elasticface_cos": (MarginConfig("elasticface_cos", 64.0, 0.35, 0.0, sigma=0.05), {}),
    "curricularface": (MarginConfig("curricularface", 64.0, 0.0, 0.5), {}),
    "adaface": (MarginConfig("adaface", 64.0, 0.0, 0.4), {}),
    "subcenter": (MarginConfig("subcenter", 64.0, 0.0, 0.5, subcenters=3), {}),
    "magface": (MarginConfig("magface", 64.0, 0.0, 0.5, lambda_g=35.0), {}),
    "ldam": (MarginConfig("ldam", 64.0, 0.0, 0.0), {}),
    "logit_adjust": (MarginConfig("cosface", 64.0, 0.35, 0.0), {"logit_adjust_tau": 1.0}),
    "interclass_filter": (MarginConfig("arcface", 64.0, 0.0, 0.5), {"interclass_filter": 0.4}),
}
# --heads with subcenter also times this reference: CosFace with K x the classes, i.e. as many
# weight rows (and sampled rows, and GEMM columns) as sub-center ArcFace with K sub-centres.
ROWS_REF = "cosface_rows"


@dataclass
class Row:
    classes: int
    sample_rate: float
    leap: str
    batch_size: int
    precision: str
    device: str
    ms_per_step: float
    peak_mem_gib: float
    leap_overhead_pct: Optional[float] = None
    head: str = "arcface"
    vs_cosface_pct: Optional[float] = None
    # --heads: spread of the per-round ratio to CosFace (wall), the same in process CPU time,
    # the reference used for `vs_ref_pct` (subcenter: cosface_rows), the update rule.
    vs_cosface_min_pct: Optional[float] = None
    vs_cosface_max_pct: Optional[float] = None
    cpu_ms_per_step: Optional[float] = None
    cpu_vs_cosface_pct: Optional[float] = None
    ref: Optional[str] = None
    vs_ref_pct: Optional[List[float]] = None      # [min, median, max] of per-round ratios, wall
    cpu_vs_ref_pct: Optional[List[float]] = None  # the same in process CPU time
    update_rows: str = "all"
    ms_rounds: Optional[List[float]] = None        # --heads: every round's ms/step, wall
    cpu_ms_rounds: Optional[List[float]] = None    # and process CPU time
    best_vs_cosface_pct: Optional[float] = None    # best round against CosFace's best round


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _long_tail_counts(num_classes: int, rng: np.random.RandomState) -> np.ndarray:
    """Zipf-like K_i in [2, 500]: a few head classes, a long tail."""
    return np.clip((500 / (1 + np.arange(num_classes)) ** 0.6).astype(np.int64), 2, 500)[
        rng.permutation(num_classes)]


def _subcenters() -> int:
    return HEADS["subcenter"][0].subcenters


def _head_spec(name: str, classes: int):
    """(margin, extra head fields, class count) of a --heads name (ROWS_REF: CosFace, K x C)."""
    if name == ROWS_REF:
        return HEADS["cosface"][0], {}, classes * _subcenters()
    margin, extra = HEADS[name]
    return margin, extra, classes


@contextlib.contextmanager
def _shared_init(rows: Optional[torch.Tensor]):
    """While building heads, PartialFC's seed-0 init draw is a view of `rows` (init_rows(0, n))
    instead of a fresh draw: the same values (init_rows does not depend on the range asked
    for), one copy in memory for every head."""
    if rows is None:
        yield
        return
    real = _pfc.init_rows

    def view(start: int, end: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
        if seed != 0 or dim != rows.shape[1] or end > rows.shape[0] or std != 0.01:
            return real(start, end, dim, seed, std)
        return rows[start:end]

    _pfc.init_rows = view
    try:
        yield
    finally:
        _pfc.init_rows = real


def build_head(classes: int, leap: str, args, device: torch.device,
               name: str = "arcface", update_rows: str = "all") -> PartialFC:
    margin, extra, classes = _head_spec(name, classes) if name in (*HEADS, ROWS_REF) else (
        _MARGIN, {}, classes)
    counts = _long_tail_counts(classes, np.random.RandomState(0))
    leap_cfg = LeapConfig(mode="full" if leap == "on" else "off", update_interval=args.update_interval)
    return PartialFC(args.dim, counts, HeadConfig(1.0, margin, update_rows=update_rows, **extra),
                     leap_cfg, single_process(device), seed=0).train()


def time_head(head: PartialFC, rate: float, leap: str, args, device: torch.device,
              name: str = "arcface") -> Row:
    """ms per forward + backward at sample rate `rate` (the head is reused across rates)."""
    if name in (*HEADS, ROWS_REF):
        margin, extra, _ = _head_spec(name, head.num_classes)
        head.head_cfg = HeadConfig(rate, margin, update_rows=head.head_cfg.update_rows, **extra)
    else:
        head.head_cfg = HeadConfig(rate, _MARGIN)
    classes = head.num_classes
    gen = torch.Generator(device=device).manual_seed(0)
    # A small label pool so classes repeat and LEAP statistics become valid during warm-up.
    pool = torch.randint(0, classes, (max(args.batch_size // 4, 1),), generator=gen, device=device)
    dtype = _DTYPES[args.precision]

    def step() -> None:
        emb = torch.randn(args.batch_size, args.dim, generator=gen, device=device, requires_grad=True)
        labels = pool[torch.randint(0, pool.numel(), (args.batch_size,), generator=gen, device=device)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = head(emb, labels)
        loss.backward()
        head.weight.grad = None

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1000 / args.steps
    cpu_ms = (time.process_time() - c0) * 1000 / args.steps
    if leap == "on" and head.leap_summary()["num_perturbed"] == 0:
        print(f"warning: LEAP perturbed no class at {classes} classes", file=sys.stderr)
    return Row(classes, rate, leap, args.batch_size, args.precision, str(device), ms,
               _peak_gib(device), head=name, cpu_ms_per_step=cpu_ms,
               update_rows=head.head_cfg.update_rows)


def _ratios(ms: Sequence[float], base: Sequence[float]) -> List[float]:
    """[min, median, max] of the per-round ratios ms / base, as percent over base."""
    pct = [100.0 * (m - b) / b for m, b in zip(ms, base)]
    return [float(min(pct)), float(np.median(pct)), float(max(pct))]


def _loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def run_heads(args) -> List[Row]:
    """Every head of args.heads (CosFace first, the reference) per class count, LEAP setting and
    rate. All heads of a setting are built first and timed in interleaved, rotated rounds
    (args.rounds);
    each row is the median over rounds, and `vs CosFace` the median of the per-round ratios, so
    a machine whose speed drifts (shared CPUs) moves both sides of each ratio alike."""
    device = torch.device(args.device)
    classes = args.classes or ([1_000_000] if device.type == "cuda" else [100_000])
    names = ["cosface"] + [h for h in args.heads if h != "cosface"]
    if "subcenter" in names and ROWS_REF not in names:
        names.append(ROWS_REF)
    rows: List[Row] = []
    for c in classes:
        for leap in args.leap:
            # One init draw shared by every head (as many rows as the largest head needs).
            k = _subcenters() if ("subcenter" in names or ROWS_REF in names) else 1
            shared = _pfc.init_rows(0, c * k, args.dim, 0).to(device)
            with _shared_init(shared):
                heads = {name: build_head(c, leap, args, device, name, args.update_rows)
                         for name in names}
            del shared
            for rate in args.sample_rates:
                load0 = _loadavg()
                print(f"# {c:,} classes, sample rate {rate}, LEAP {leap}, update_rows "
                      f"{args.update_rows}, {torch.get_num_threads()} thread(s), load average "
                      f"before {load0}", flush=True)
                per_round = {name: [] for name in names}
                for r in range(args.rounds):
                    # Each round starts at another head: no head always runs first (a cold
                    # first head measured ~15% slow on the shared CPU).
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        per_round[name].append(
                            time_head(heads[name], rate, leap, args, device, name))
                    print(f"# round {r + 1}/{args.rounds} done, load average {_loadavg()}",
                          file=sys.stderr, flush=True)
                base = [r.ms_per_step for r in per_round["cosface"]]
                cpu_base = [r.cpu_ms_per_step for r in per_round["cosface"]]
                for name in names:
                    ms = [r.ms_per_step for r in per_round[name]]
                    cpu = [r.cpu_ms_per_step for r in per_round[name]]
                    row = per_round[name][-1]
                    row.ms_per_step = float(np.median(ms))
                    row.cpu_ms_per_step = float(np.median(cpu))
                    row.ms_rounds, row.cpu_ms_rounds = ms, cpu
                    if name != "cosface":
                        # Other jobs only add time: the best rounds are the least disturbed.
                        row.best_vs_cosface_pct = 100.0 * (min(cpu) - min(cpu_base)) / min(cpu_base)
                    if name != "cosface":
                        row.vs_cosface_min_pct, row.vs_cosface_pct, row.vs_cosface_max_pct = \
                            _ratios(ms, base)
                        row.cpu_vs_cosface_pct = _ratios(cpu, cpu_base)[1]
                    if name == "subcenter":
                        row.ref = ROWS_REF
                        row.vs_ref_pct = _ratios(ms, [x.ms_per_step for x in per_round[ROWS_REF]])
                        row.cpu_vs_ref_pct = _ratios(
                            cpu, [x.cpu_ms_per_step for x in per_round[ROWS_REF]])
                    rows.append(row)
                    print(_fmt_head(row), flush=True)
                print(f"# load average after {_loadavg()}", flush=True)
            del heads
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt_head(r: Row) -> str:
    over = "" if r.vs_cosface_pct is None else (
        f"{r.vs_cosface_min_pct:+.1f}% / {r.vs_cosface_pct:+.1f}% / {r.vs_cosface_max_pct:+.1f}%")
    cpu = "" if r.cpu_vs_cosface_pct is None else (
        f"{r.cpu_vs_cosface_pct:+.1f}% / {r.best_vs_cosface_pct:+.1f}%")
    ref = "" if r.vs_ref_pct is None else (
        "{:+.1f}% / {:+.1f}% / {:+.1f}%".format(*r.vs_ref_pct)
        + " (CPU time {:+.1f}% / {:+.1f}% / {:+.1f}%)".format(*r.cpu_vs_ref_pct))
    name = f"{r.head} (K={_subcenters()})" if r.head == "subcenter" else (
        f"{ROWS_REF} ({_subcenters()} x classes)" if r.head == ROWS_REF else r.head)
    return (f"| {name} | {r.classes:,} | {r.sample_rate} | {r.leap} | {r.batch_size} | "
            f"{r.precision} | {r.ms_per_step:.2f} | {over} | {cpu} | {ref} |")


def run(args) -> List[Row]:
    device = torch.device(args.device)
    classes = args.classes or ([93_431, 2_000_000] if device.type == "cuda" else [9_343, 20_000])
    rows: List[Row] = []
    for c in classes:
        base = {}
        for leap in args.leap:
            head = build_head(c, leap, args, device)
            for rate in args.sample_rates:
                row = time_head(head, rate, leap, args, device)
                if leap == "off":
                    base[rate] = row.ms_per_step
                elif rate in base:
                    row.leap_overhead_pct = 100.0 * (row.ms_per_step - base[rate]) / base[rate]
                rows.append(row)
                print(_fmt(row), flush=True)
            del head
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(r: Row) -> str:
    over = "" if r.leap_overhead_pct is None else f"{r.leap_overhead_pct:+.1f}%"
    return (f"| {r.classes:,} | {r.sample_rate} | {r.leap} | {r.batch_size} | {r.precision} | "
            f"{r.ms_per_step:.2f} | {over} | {r.peak_mem_gib:.2f} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--classes", type=int, nargs="*", help="class counts (default: by device)")
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1], help="head.sample_rate values")
    p.add_argument("--leap", nargs="+", default=["off", "on"], choices=["off", "on"], help="LEAP settings")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 256 cuda, 64 cpu)")
    p.add_argument("--dim", type=int, default=512, help="embedding size")
    p.add_argument("--precision", default=None, choices=list(_DTYPES), help="autocast dtype "
                   "(default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--update-interval", type=int, default=5, help="leap.update_interval")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30 cuda, 5 cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here as JSON")
    p.add_argument("--heads", nargs="*", default=None, choices=["all", *HEADS],
                   help="time these heads against CosFace instead (default classes: 1,000,000 "
                        "cuda, 100,000 cpu)")
    p.add_argument("--rounds", type=int, default=3, help="--heads: interleaved timing rounds "
                   "(the median is reported)")
    p.add_argument("--update-rows", default="all", choices=["all", "sampled"],
                   help="--heads: head.update_rows of every head")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA build of torch and a visible GPU")
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (30 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heads is not None:
        args.heads = list(HEADS) if "all" in args.heads or not args.heads else args.heads
        print("| head | classes | sample rate | LEAP | batch | precision | ms/step (median) | "
              "vs CosFace, wall: min / median / max | vs CosFace, CPU time: median / best | "
              f"vs {ROWS_REF}: min / median / max |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        rows = run_heads(args)
    else:
        print("| classes | sample rate | LEAP | batch | precision | ms/step | LEAP overhead | peak mem GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        rows = run(args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
