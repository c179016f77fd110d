"""Backbone throughput: forward + backward + SGD step on synthetic on-device batches.

No classifier and no data loading: this is the ceiling a full training step can approach. The
loss is the mean square of the embeddings, so the backward pass runs through every backbone
layer at the cost of a real loss.

Comparing with InsightFace: their iresnet wraps its trunk in `autocast(enabled=fp16)`, so with
fp16=False it switches OFF an outer bf16 autocast and runs the trunk in fp32 (TF32). On one H100
(2026-11-26, batch 256, channels_last, 30 steps) their iresnet50 built that way gives 2,971
samples/s in this harness, the same as ours in fp32 and as the "bf16 eager 2,985" anchor; ours
under bf16 gives ~4,500-4,660, and both give 5,500 under fp16.

    python benchmarks/backbone_bench.py                      # CPU, tiny, 32x32, batch 128
    python benchmarks/backbone_bench.py --device cuda --backbone iresnet50 --image-size 112 \
        --batch-size 256 512 --precision bf16 --channels-last --compile

Peak memory: on CUDA the allocator's peak for the timed steps; on CPU the process's peak
resident set (includes Python and torch themselves).
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from facetrain.models.registry import build_backbone

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchResult:
    backbone: str
    batch_size: int
    image_size: int
    precision: str
    channels_last: bool
    compiled: bool
    device: str
    samples_per_s: float
    ms_per_step: float
    peak_mem_gib: float
    threads: int


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(backbone: str = "tiny", batch_size: int = 128, image_size: int = 32,
          embedding_size: int = 512, device: str = "cpu", precision: str = "fp32",
          channels_last: bool = False, compile: bool = False, steps: int = 20,
          warmup: int = 5, seed: int = 0) -> BenchResult:
    """Time `steps` fwd+bwd+SGD steps of one backbone after `warmup` untimed ones."""
    if precision not in _DTYPES:
        raise ValueError(f"--precision must be one of {', '.join(_DTYPES)}; got {precision!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_backbone(backbone, embedding_size=embedding_size, image_size=image_size)
    model = model.to(dev).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = (torch.rand(batch_size, 3, image_size, image_size, device=dev) * 2 - 1)
    x = x.contiguous(memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    dtype = _DTYPES[precision]
    # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    fwd = torch.compile(model) if compile else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            emb = fwd(x)
        loss = emb.float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    elapsed = time.perf_counter() - start
    return BenchResult(backbone, batch_size, image_size, precision, channels_last, compile,
                       str(dev), batch_size * steps / elapsed, 1e3 * elapsed / steps,
                       _peak_memory_gib(dev), torch.get_num_threads())


def format_table(rows: Sequence[BenchResult]) -> str:
    """Markdown table, one row per configuration."""
    head = ("| backbone | batch | image | precision | channels_last | compile | device | threads "
            "| samples/s | ms/step | peak mem GiB |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        lines.append(f"| {r.backbone} | {r.batch_size} | {r.image_size} | {r.precision} | "
                     f"{r.channels_last} | {r.compiled} | {r.device} | {r.threads} | "
                     f"{r.samples_per_s:,.0f} | {r.ms_per_step:.1f} | {r.peak_mem_gib:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", nargs="+", default=["tiny"],
                   help="registered backbone name(s) (facetrain.models.registry.available())")
    p.add_argument("--batch-size", nargs="+", type=int, default=[128],
                   help="batch size(s) per step; one table row each")
    p.add_argument("--image-size", type=int, default=32, help="square input side in pixels")
    p.add_argument("--embedding-size", type=int, default=512,
                   help="output dimension (use 2048 for resnet50_reid)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--precision", choices=sorted(_DTYPES), default="fp32",
                   help="autocast dtype for the forward pass (fp32: no autocast)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and input in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (compilation, cudnn autotuning)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> List[BenchResult]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    rows = []
    for name in args.backbone:
        for bs in args.batch_size:
            rows.append(bench(name, bs, args.image_size, args.embedding_size, args.device,
                              args.precision, args.channels_last, args.compile, args.steps,
                              args.warmup))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
