"""Will it fit? Per-GPU memory and per-step communication of a facetrain run, before renting GPUs.

    python launch/plan.py --classes 2059906 --world-size 32 --sample-rate 0.3 \\
        --backbone iresnet200 --batch-size 128 --precision fp16 --optimizer sgd --leap full \\
        --gpu-memory-gb 80

prints the memory breakdown per GPU (classifier weights, gradient and optimizer state, the used
rows and the sampled logits with their gradient, LEAP's centres, angle memory and statistics,
the backbone's parameters, gradients, optimizer state and activations), the bytes each
collective sends per step, whether the run fits and the largest class count that does. The
model behind the numbers and its checks are in docs/scale.md; --json prints it all as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent

from facetrain import plan


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, required=True, help="identities in the training set")
    ap.add_argument("--world-size", type=int, default=8, help="GPUs in the job")
    ap.add_argument("--sample-rate", type=float, default=1.0, help="head.sample_rate")
    ap.add_argument("--backbone", default="iresnet50", choices=sorted(plan.BACKBONE_PARAMS))
    ap.add_argument("--batch-size", type=int, default=128, help="per GPU (data.batch_size)")
    ap.add_argument("--precision", default="fp16", choices=sorted(plan.HALF))
    ap.add_argument("--optimizer", default="sgd", choices=sorted(plan.OPTIMIZER_STATES))
    ap.add_argument("--leap", default="full", choices=["off", "vanilla", "full"])
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, GiB")
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--images-per-class", type=float, default=20.0,
                    help="mean K_i (LEAP's angle memory keeps ceil(K_i * P) angles per class)")
    ap.add_argument("--memory-factor", type=float, default=1.0, help="leap.memory_factor (P)")
    ap.add_argument("--update-rows", default="all", choices=["all", "sampled"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--reserve-mb", type=float, default=1024.0,
                    help="CUDA context, library workspaces and allocator slack per GPU")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    p = plan.PlanInput(
        classes=args.classes, world_size=args.world_size, sample_rate=args.sample_rate,
        backbone=args.backbone, batch_size=args.batch_size, precision=args.precision,
        optimizer=args.optimizer, leap=args.leap, gpu_memory_gb=args.gpu_memory_gb,
        embedding_size=args.embedding_size, images_per_class=args.images_per_class,
        memory_factor=args.memory_factor, update_rows=args.update_rows,
        activation_checkpointing=args.activation_checkpointing, reserve_mb=args.reserve_mb)
    try:
        p.check()
    except ValueError as exc:
        ap.error(str(exc))
    print(json.dumps(plan.as_dict(p), indent=1) if args.json else plan.report(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
