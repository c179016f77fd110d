"""CurricularFace's hard-negative modulation on one logit block, against CosFace's margin.

Three variants, each the margin path (`margin_logits`) plus softmax cross-entropy, forward and
backward, on the same [B, C] fp32 cosine block: `cosface` (no change to the other logits),
`curricular_old` (the plain-autograd formula `torch.where(hard, x * (t + x / s), x)` that
CurricularFace used before the fused node) and `curricular` (today's `_HardNegatives`). Also the
modulation alone (`others`, forward and backward) for the old formula and the fused one. Timed in
interleaved rounds whose order rotates, in process CPU time (one thread: the work itself), with
the median per-round difference to CosFace.

    OMP_NUM_THREADS=1 python benchmarks/modulation_bench.py --rounds 9   # [64, 100,000]: the
                                                # block of the 1M-class, sample-rate-0.1 step
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# classifier_bench is the sibling script: its folder is on the path when this file runs
from classifier_bench import _loadavg
from facetrain.config import MarginConfig
from facetrain.heads.kinds import build_margin
from facetrain.heads.kinds.curricularface import CurricularFace
from facetrain.heads.margins import margin_logits


class OldCurricularFace(CurricularFace):
    """CurricularFace with the modulation as it was: plain autograd through `torch.where`."""

    def others(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.scale
        hard = logits.detach() > (s * self.threshold).unsqueeze(1)
        return torch.where(hard, logits * (self.t + logits / s), logits)


def make_block(batch: int, classes: int, dim: int, seed: int = 0):
    """Cosines of random unit embeddings with random unit class rows (what an untrained head
    sees: |cos| ~ 1 / sqrt(dim)), each sample's target column, all targets local."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.randn(batch, classes, generator=g) / math.sqrt(dim)
    col = torch.randint(0, classes, (batch,), generator=g)
    return cos.clamp(-1.0, 1.0), col, torch.ones(batch, dtype=torch.bool)


def variants(cos: torch.Tensor, col: torch.Tensor, local: torch.Tensor, t: float
             ) -> Dict[str, Callable[[], None]]:
    """name -> one forward + backward on the block (a fresh leaf each call)."""
    kinds = {"cosface": build_margin(MarginConfig("cosface", 64.0, 0.35, 0.0)),
             "curricular_old": OldCurricularFace(MarginConfig("curricularface", 64.0, 0.0, 0.5)),
             "curricular": build_margin(MarginConfig("curricularface", 64.0, 0.0, 0.5))}
    for k in ("curricular_old", "curricular"):
        kinds[k].t.fill_(t)

    def path(kind) -> Callable[[], None]:
        def run() -> None:
            leaf = cos.clone().requires_grad_(True)
            logits = margin_logits(leaf, col, local, kind)
            F.cross_entropy(logits, col).backward()
        return run

    def alone(kind) -> Callable[[], None]:
        kind.prepare(cos.gather(1, col.view(-1, 1)).squeeze(1), torch.zeros(cos.shape[0]),
                     local, None)
        up = torch.randn(cos.shape, generator=torch.Generator().manual_seed(1))

        def run() -> None:
            leaf = (cos * kind.scale).requires_grad_(True)
            kind.others(leaf).backward(up)
        return run

    out = {name: path(kind) for name, kind in kinds.items()}
    out["others_old"] = alone(kinds["curricular_old"])
    out["others_fused"] = alone(kinds["curricular"])
    return out


def time_rounds(fns: Dict[str, Callable[[], None]], rounds: int, steps: int, warmup: int
                ) -> Dict[str, List[float]]:
    """CPU ms per call of each function, per round; the order rotates every round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    ms: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0 = time.process_time()
            for _ in range(steps):
                fns[name]()
            ms[name].append((time.process_time() - c0) * 1000 / steps)
    return ms


def _spread(xs: Sequence[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in (min(xs), float(np.median(xs)), max(xs)))


def main(argv: Sequence[str] | None = None) -> Dict[str, List[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=100_000, help="columns of the block")
    p.add_argument("--dim", type=int, default=512, help="sets the cosines' spread")
    p.add_argument("--t", type=float, default=0.3, help="CurricularFace's t")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=3, help="calls per round")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    cos, col, local = make_block(args.batch_size, args.classes, args.dim)
    fns = variants(cos, col, local, args.t)
    kind = build_margin(MarginConfig("curricularface", 64.0, 0.0, 0.5))
    kind.prepare(cos.gather(1, col.view(-1, 1)).squeeze(1), torch.zeros(cos.shape[0]), local, None)
    hard = float((cos > kind.threshold.unsqueeze(1)).float().mean())
    print(f"block [{args.batch_size}, {args.classes}] fp32, {torch.get_num_threads()} thread(s), "
          f"hard negatives {100 * hard:.1f}%, load average before {_loadavg()}")
    ms = time_rounds(fns, args.rounds, args.steps, args.warmup)
    print(f"load average after {_loadavg()}")
    print("| variant | CPU ms: min / median / max | minus CosFace's path, per round: median |")
    print("| --- | --- | ---: |")
    for name, xs in ms.items():
        diff = "" if not name.startswith("curricular") else \
            f"{float(np.median([a - b for a, b in zip(xs, ms['cosface'])])):+.1f} ms"
        print(f"| {name} | {_spread(xs)} | {diff} |")
    return ms


if __name__ == "__main__":
    main()
