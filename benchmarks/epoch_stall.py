"""Wait for each epoch's first batch: torch loader workers kept across epochs (today) against a
new loader per epoch (how every epoch started before), interleaved in one process.

    python benchmarks/epoch_stall.py --epochs 4 --rounds 3 --workers 1

Both sides read the same RecordIO of 32x32 JPEGs (the main job's glyph size) with batch 64 and
the trainer's iteration pattern (set_epoch, iterate the epoch); the first epoch is reported
apart (its workers start in both cases).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def first_batch_waits(loader, epochs: int) -> list:
    waits = []
    for e in range(epochs):
        loader.set_epoch(e)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        waits.append(time.perf_counter() - t0)
        for _ in it:
            pass
    return waits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    from facetrain.config import DataConfig
    from facetrain.data.torch_loader import TorchTrainLoader
    from facetrain.data.dataset import RecordDataset
    from facetrain.dist import DistContext
    from loader_throughput import build_rec, make_jpegs

    ctx = DistContext(0, 1, 0, torch.device("cpu"), None, None)
    with tempfile.TemporaryDirectory() as tmp:
        rec = build_rec(Path(tmp), args.images, 64, make_jpegs(64, 32, 0))
        cfg = DataConfig(rec=rec, batch_size=64, num_workers=args.workers, image_size=32)

        def persistent():
            ld = TorchTrainLoader(RecordDataset.open(rec), cfg, ctx, 0)
            try:
                return first_batch_waits(ld, args.epochs)
            finally:
                ld.close()

        def fresh():                                  # a new loader (new workers) per epoch
            waits = []
            for e in range(args.epochs):
                ld = TorchTrainLoader(RecordDataset.open(rec), cfg, ctx, 0)
                ld.set_epoch(e)
                waits += first_batch_waits_from(ld, e)
                ld.close()
            return waits

        def first_batch_waits_from(ld, e):
            t0 = time.perf_counter()
            it = iter(ld)
            next(it)
            w = time.perf_counter() - t0
            for _ in it:
                pass
            return [w]

        res = {"persistent": [], "fresh": []}
        for r in range(args.rounds):
            for name in (("persistent", "fresh") if r % 2 == 0 else ("fresh", "persistent")):
                w = persistent() if name == "persistent" else fresh()
                res[name].append(w)
                print(f"round {r} {name}: " + " ".join(f"{x:.3f}" for x in w) + " s", flush=True)
        for name, runs in res.items():
            first = [w[0] for w in runs]
            later = [x for w in runs for x in w[1:]]
            print(f"{name}: epoch 0 median {statistics.median(first):.3f} s; later epochs "
                  f"max {max(later):.3f} s, median {statistics.median(later):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
