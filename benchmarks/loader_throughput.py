"""Loader throughput (images/s) of the DALI and torch loaders, and make_longtail's copy speed.

    python benchmarks/loader_throughput.py                      # CPU: DALI CPU + torch, 2 workers
    python benchmarks/loader_throughput.py --device cuda --images 20000 --batch 256 --workers 8

Builds a temporary InsightFace-layout RecordIO of 112x112 JPEGs (face-crop-like: smooth colour
fields plus noise, ~5-7 KB each), runs each loader for --epochs epochs after one warm-up batch and
prints images/s. Then copies a --longtail-records record set with make_longtail (head = most
classes, so nearly every record is copied) and prints records/s. The page cache holds the data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def make_jpegs(n_unique: int, size: int, seed: int):
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_unique):
        base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size),
                          interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def build_rec(folder: Path, n_images: int, n_classes: int, jpegs) -> str:
    from facetrain.build.writer import write_insightface_dataset

    per = [n_images // n_classes + (1 if c < n_images % n_classes else 0)
           for c in range(n_classes)]
    items = ((c, jpegs[(c * 7919 + i) % len(jpegs)]) for c in range(n_classes)
             for i in range(per[c]))
    write_insightface_dataset(folder / "train", items, n_classes, 112)
    return str(folder / "train")


def time_loader(kind: str, rec: str, args) -> float:
    import torch

    from facetrain.config import DataConfig
    from facetrain.data import build_train_loader
    from facetrain.dist import single_process

    cfg = DataConfig(rec=rec, loader=kind, batch_size=args.batch, num_workers=args.workers,
                     image_size=112, random_flip=True)
    ctx = single_process(torch.device(args.device))
    loader = build_train_loader(cfg, ctx, seed=0)
    n = 0
    t0 = None
    for epoch in range(args.epochs + 1):
        loader.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if t0 is None:                   # the first batch includes start-up: not timed
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                continue
            n += x.shape[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    loader.close()
    return n / (time.perf_counter() - t0)


def time_longtail(folder: Path, jpegs, n_records: int) -> float:
    from facetrain.build.longtail import make_longtail

    n_classes = max(2, n_records // 50)
    src = build_rec(folder / "lt_src", n_records, n_classes, jpegs)
    # Warm the page cache (the target is "a shard in the page cache").
    with open(src + ".rec", "rb") as fh:
        while fh.read(1 << 24):
            pass
    s = make_longtail(src, str(folder / "lt_out"), head=n_classes - 10, tail=None,
                      tail_samples=5, seed=0)
    return s.records_per_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images in the benchmark set")
    p.add_argument("--classes", type=int, default=400, help="classes in the benchmark set")
    p.add_argument("--batch", type=int, default=128, help="batch size per step")
    p.add_argument("--workers", type=int, default=2,
                   help="torch DataLoader workers / DALI CPU threads")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (after a warm-up epoch)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: DALI decodes on the GPU (mixed) and batches land on the GPU")
    p.add_argument("--loaders", default="dali,torch", help="comma list of loaders to time")
    p.add_argument("--longtail-records", type=int, default=100000,
                   help="records for the make_longtail copy benchmark (0 skips it)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        jpegs = make_jpegs(min(args.images, 4000), 112, seed=0)
        rec = build_rec(folder / "bench", args.images, args.classes, jpegs)
        size_kb = sum(len(j) for j in jpegs) / len(jpegs) / 1024
        rows = []
        for kind in [k for k in args.loaders.split(",") if k]:
            name = f"{kind} ({'GPU mixed decode' if kind == 'dali' and args.device == 'cuda' else 'CPU decode'})"
            rows.append((name, f"{time_loader(kind, rec, args):,.0f} img/s"))
        if args.longtail_records:
            rows.append((f"make_longtail copy ({args.longtail_records:,} records)",
                         f"{time_longtail(folder, jpegs, args.longtail_records):,.0f} rec/s"))
    print(f"\n{args.images} JPEGs 112x112 (~{size_kb:.1f} KB), batch {args.batch}, "
          f"{args.workers} workers/threads, device {args.device}, {os.cpu_count()} CPUs")
    print(f"| {'what':<44} | {'throughput':>14} |\n|{'-' * 46}|{'-' * 16}|")
    for what, val in rows:
        print(f"| {what:<44} | {val:>14} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
