"""Peak memory of one training step with and without `model.activation_checkpointing`.

Each setting runs in a FRESH process (peak resident set size is per process and never goes
down), which builds the backbone, a 1,000-class linear classifier and SGD with momentum, then
runs one step: forward, cross-entropy, backward, optimizer step. The peak RSS of the child
(`ru_maxrss`) is reported with the RSS just before the step (weights, optimizer, interpreter),
so the difference is what the step itself needed. CPU, fp32, the default in the issue:

    python benchmarks/activation_checkpointing.py                     # iresnet100, batch 64, 112
    python benchmarks/activation_checkpointing.py --backbone vit_b --batch-size 32

It allocates several GB and takes minutes on a small machine; results go to stdout as a table
and one JSON line (record them in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


def _rss_mb() -> float:
    """Current resident set of this process, MB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args: argparse.Namespace) -> Dict[str, float]:
    import torch
    from facetrain.models.registry import build_backbone
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kwargs = {"embedding_size": 512, "image_size": args.image_size}
    if args.checkpointing:
        kwargs["activation_checkpointing"] = True
    model = build_backbone(args.backbone, **kwargs).train()
    classifier = torch.nn.Linear(512, 1000, bias=False)
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:                         # momentum buffers exist before the measured step
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1
    y = torch.randint(0, 1000, (args.batch_size,))
    before = _rss_mb()
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(classifier(model(x)), y)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB -> MB on Linux
    return {"rss_before_step_mb": before, "peak_rss_mb": peak, "step_s": seconds,
            "loss": float(loss)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="iresnet100")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    rows = {}
    for label, flag in (("plain", []), ("checkpointed", ["--checkpointing"])):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--backbone",
               args.backbone, "--batch-size", str(args.batch_size), "--image-size",
               str(args.image_size), "--threads", str(args.threads), *flag]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{label:13s} peak RSS {rows[label]['peak_rss_mb']:9,.0f} MB   before the step "
              f"{rows[label]['rss_before_step_mb']:7,.0f} MB   step {rows[label]['step_s']:6.1f} s",
              flush=True)
    p, c = rows["plain"], rows["checkpointed"]
    saved = 1 - c["peak_rss_mb"] / p["peak_rss_mb"]
    step_saved = 1 - (c["peak_rss_mb"] - c["rss_before_step_mb"]) / \
        (p["peak_rss_mb"] - p["rss_before_step_mb"])
    print(f"peak RSS {saved:.1%} lower with checkpointing ({step_saved:.1%} lower for what the "
          f"step adds); loss {p['loss']:.6f} vs {c['loss']:.6f}")
    print(json.dumps({"backbone": args.backbone, "batch_size": args.batch_size,
                      "image_size": args.image_size, "threads": args.threads,
                      "machine": platform.processor() or platform.machine(),
                      "rows": rows, "peak_reduction": saved}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
