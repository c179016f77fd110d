"""Check the capacity planner (facetrain/plan.py) against memory measured on gloo ranks.

For each (classes, ranks, sample rate) this starts FRESH CPU processes with a gloo group; each
rank builds facetrain's PartialFC with LEAP (full, refreshed every step) and torch SGD with
momentum, runs two training steps on random embeddings and reports
- `state`: bytes of the tensors that persist between steps (weight, gradient, momentum, every
  LEAP buffer; unique storages), and
- `peak`: its peak resident set (VmHWM, reset just before the head is built) minus its
  resident set at that moment, i.e. what the classifier and LEAP needed at their worst moment
  of the step.
The planner's classifier + LEAP lines (no backbone, no reserve) are printed beside them for the
largest shard (rank 0). Results: a markdown table on stdout (docs/scale.md records one run).

    python benchmarks/plan_check.py                       # 100k .. 2M classes, 1-3 ranks
    python benchmarks/plan_check.py --classes 100000 --ranks 2 --dim 128
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from facetrain import plan

MB = 2 ** 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the peak is this step's and not
    that of the imports before it (Linux: `5` in /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    import numpy as np
    from facetrain.config import HeadConfig, LeapConfig, MarginConfig
    from facetrain.dist import DistContext
    from facetrain.heads.partial_fc import PartialFC

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo", dist.group.WORLD)
    c, d, b, k_i = args["classes"], args["dim"], args["batch"], args["images_per_class"]
    counts = np.full(c, k_i, dtype=np.int64)
    # Warm-up on 64 classes: lazy initialisation (kernels, thread pools, gloo buffers) is not the
    # classifier's memory.
    small = PartialFC(d, np.full(64 * world, k_i), HeadConfig(sample_rate=0.5),
                      LeapConfig(mode="full", update_interval=1), ctx, seed=1).train()
    small(torch.randn(b, d, requires_grad=True), torch.randint(0, 64 * world, (b,))).backward()
    del small
    dist.barrier()
    import gc
    gc.collect()
    base = _rss_bytes()
    _reset_peak()
    head = PartialFC(d, counts, HeadConfig(sample_rate=args["sample_rate"],
                                           margin=MarginConfig(kind="cosface", m_cos=0.35)),
                     LeapConfig(mode="full", update_interval=1, start_epoch=0), ctx, seed=0)
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        emb = torch.randn(b, d, generator=gen, requires_grad=True)
        labels = torch.randint(0, c, (b,), generator=gen)
        head(emb, labels).backward()
        opt.step()
        if _ == 0:
            opt.zero_grad(set_to_none=True)     # as the trainer does after every step
    peak = _peak_bytes() - base
    state = _storage_bytes([head.weight, head.weight.grad, *head.leap.buffers(),
                            *[v for s in opt.state.values() for v in s.values()
                              if torch.is_tensor(v)]])
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "local": head.num_local, "peak": peak, "state": state}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(classes: int, ranks: int, sample_rate: float, dim: int, batch: int,
            images_per_class: int) -> List[Dict]:
    """One fresh gloo job; the per-rank results."""
    import torch.multiprocessing as mp
    # Every allocation over 1 MiB gets its own mapping and goes back to the system when freed, so
    # the resident set follows the live tensors (glibc's adaptive threshold would keep freed
    # blocks of up to 32 MiB in the heap, and the peak would depend on allocation history).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    args = {"classes": classes, "dim": dim, "batch": batch, "sample_rate": sample_rate,
            "images_per_class": images_per_class}
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(ranks, _free_port(), args, out), nprocs=ranks, join=True)
        return sorted((json.loads(p.read_text()) for p in Path(out).glob("rank*.json")),
                      key=lambda r: r["rank"])


def planned(classes: int, ranks: int, sample_rate: float, dim: int, batch: int,
            images_per_class: int) -> Dict[str, float]:
    """The planner's classifier + LEAP bytes for rank 0 (no backbone): persistent state and the
    state plus the step's peak (eager LEAP, as on CPU)."""
    p = plan.PlanInput(classes=classes, world_size=ranks, sample_rate=sample_rate,
                       batch_size=batch, precision="fp32", optimizer="sgd", leap="full",
                       embedding_size=dim, images_per_class=images_per_class, fused_leap=False)
    state = sum(plan.classifier_memory(p).values()) + sum(plan.leap_memory(p).values())
    backward = sum(plan.classifier_step_memory(p).values())
    step = plan.optimizer_step_memory(p)["classifier optimizer step scratch"]
    return {"state": state, "peak": state + max(backward, step)}


def _print_header() -> None:
    print("| classes | ranks | sample rate | planned state MiB | measured state MiB | "
          "planned peak MiB | measured peak MiB (max rank, less overhead) | peak error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _print_row(c: int, w: int, r: float, want: Dict[str, float], got: List[Dict],
               overhead: float) -> None:
    top = got[0]                                  # rank 0 holds the largest shard
    peak = max(g["peak"] for g in got) - overhead
    print(f"| {c:,} | {w} | {r:g} | {want['state'] / MB:,.1f} | {top['state'] / MB:,.1f} | "
          f"{want['peak'] / MB:,.1f} | {peak / MB:,.1f} | {want['peak'] / peak - 1:+.1%} |",
          flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+",
                    default=[100_000, 500_000, 1_000_000, 2_000_000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sample-rate", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--dim", type=int, default=128, help="embedding size (128 keeps 2M classes "
                    "within a small machine's memory)")
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    ap.add_argument("--images-per-class", type=int, default=20)
    ap.add_argument("--full-softmax-max", type=int, default=500_000,
                    help="run sample rate 1 only up to this many classes (memory)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--from-json", type=Path, help="re-print the table of an earlier --json run "
                    "with the current planner (no measuring)")
    args = ap.parse_args(argv)
    shape = (args.dim, args.batch, args.images_per_class)
    if args.from_json:
        _print_header()
        for row in json.loads(args.from_json.read_text()):
            want = planned(row["classes"], row["ranks"], row["sample_rate"], *shape)
            _print_row(row["classes"], row["ranks"], row["sample_rate"], want, row["measured"],
                       row["overhead"])
        return 0
    # What a rank's first real step costs whatever the class count (lazily loaded kernels,
    # allocator arenas): the same job at 1,000 classes per rank, less what the plan says for it.
    overhead = {}
    for w in args.ranks:
        small = measure(1000 * w, w, 0.1, *shape)
        overhead[w] = max(g["peak"] for g in small) - planned(1000 * w, w, 0.1, *shape)["peak"]
    print(f"fixed per-process overhead subtracted (MiB, by ranks): "
          f"{ {w: round(v / MB, 1) for w, v in overhead.items()} }")
    rows = []
    _print_header()
    for c in args.classes:
        for w in args.ranks:
            for r in args.sample_rate:
                if r >= 1.0 and c > args.full_softmax_max:
                    continue
                got = measure(c, w, r, *shape)
                want = planned(c, w, r, *shape)
                rows.append({"classes": c, "ranks": w, "sample_rate": r, "planned": want,
                             "measured": got, "overhead": overhead[w]})
                _print_row(c, w, r, want, got, overhead[w])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
