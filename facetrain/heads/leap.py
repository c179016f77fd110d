"""LEAP state of one classifier shard: class centres, angle memory, statistics, feature-cloud std.

Everything per class lives on the rank that owns the class (shared/design/leap.md, "Inside the
sharded classifier"). Buffers carry one extra scratch slot at the end (row C_local, memory slot
M) so that samples of classes owned elsewhere can be routed there instead of being filtered out,
which would need a host sync (nonzero) every update.

Variance: sigma_i^2 is the unbiased variance (n - 1) of class i's buffer, valid once it holds 2
angles; Eq. 9's (K_i - 1) weights are the classical pooled-variance weights for it.

Controls (leap.control, for the experiments of issue 6):
- "none": LEAP as in leap.md.
- "null": the baseline loss, but every step draws the same random angles LEAP would (same
  generator, same shapes) and discards them, so a LEAP/null pair differs only in the cloud.
- "uniform": the same average noise variance, untargeted. Let P be the classes LEAP would
  perturb (valid stats and sigma_i^2 < sigma^2; vanilla: tail classes only) over all ranks; every
  sample of ANY class with valid stats gets std = sqrt(mean over i in P of (sigma^2 - sigma_i^2)).

Communication: per step one all-reduce of a global-batch-length vector (`batch_std`); at update
steps two tiny all-reduces in `refresh` (3 and 2 scalars: the pooled variance's two sums plus
the valid count, then the uniform control's mean gap plus the perturbed-class count).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facetrain.config import LeapConfig


def memory_sizes(counts: torch.Tensor, memory_factor: float) -> torch.Tensor:
    """S_i = ceil(K_i * P), at least 1 ([C] int64). The 1e-9 keeps 10 * 0.3 at 3, not 4."""
    s = torch.ceil(counts.to(torch.float64) * memory_factor - 1e-9).to(torch.int64)
    return s.clamp(min=1)


class LeapState(torch.nn.Module):
    """Centres, ring-buffer angle memory and statistics for classes [start, start + C_local).

    class_counts: [C_local] K_i of the owned classes. Buffers (all sharded by class):
    centers [C+1, D], seen [C+1], memory [M+1] (class i's ring is memory[off_i : off_i + S_i]),
    count [C+1] angles ever written, sum/sumsq [C+1] float64 running sums over the ring,
    class_std [C+1] the feature-cloud std of each class (0 = not perturbed).
    Replicated scalars (same on every rank): pooled_var, uniform_var, num_valid, num_perturbed.
    """

    def __init__(self, class_counts: torch.Tensor, start: int, embedding_size: int,
                 cfg: LeapConfig, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.start = start
        counts = class_counts.to(torch.int64).cpu()
        self.num_local = int(counts.numel())
        sizes = memory_sizes(counts, cfg.memory_factor)
        c1 = self.num_local + 1
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
        self.mem_total = int(offsets[-1])
        self.register_buffer("counts", counts.to(device), persistent=False)
        # The scratch class has a 1-slot ring at index mem_total.
        self.register_buffer("mem_size", torch.cat([sizes, torch.ones(1, dtype=torch.int64)]).to(device),
                             persistent=False)
        self.register_buffer("mem_offset", offsets.to(device), persistent=False)
        self.register_buffer("centers", torch.zeros(c1, embedding_size, device=device))
        self.register_buffer("seen", torch.zeros(c1, dtype=torch.bool, device=device))
        self.register_buffer("memory", torch.zeros(self.mem_total + 1, device=device))
        self.register_buffer("count", torch.zeros(c1, dtype=torch.int64, device=device))
        self.register_buffer("sum", torch.zeros(c1, dtype=torch.float64, device=device))
        self.register_buffer("sumsq", torch.zeros(c1, dtype=torch.float64, device=device))
        self.register_buffer("class_std", torch.zeros(c1, device=device))
        # pooled_var, uniform_var, num_valid, num_perturbed (global, replicated).
        self.register_buffer("globals", torch.zeros(4, dtype=torch.float64, device=device))

    # ---- statistics -------------------------------------------------------------------------
    def stats(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, var, valid) of the owned classes, [C_local] each, from the running sums."""
        n = torch.minimum(self.count, self.mem_size)[:-1].to(torch.float64)
        s, ss = self.sum[:-1], self.sumsq[:-1]
        valid = n >= 2
        mean = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
        var = torch.where(valid, (ss - s * s / n.clamp(min=1)) / (n - 1).clamp(min=1), torch.zeros_like(s))
        return mean.float(), var.clamp(min=0).float(), valid

    def refresh(self, group: Optional[dist.ProcessGroup]) -> None:
        """Recompute sigma^2 (Eq. 9 or Eq. 6) and every owned class's std. O(C_local), once per
        update, next to the O(B * C_local) logit block of every step."""
        _, var, valid = self.stats()
        var = var.to(torch.float64)
        k = self.counts.to(torch.float64)
        head = self.counts > self.cfg.head_threshold
        if self.cfg.mode == "vanilla":
            w = (head & valid).to(torch.float64)          # Eq. 6: plain mean over head classes
        else:
            w = (k - 1).clamp(min=0) * valid              # Eq. 9: (K_i - 1) weights
        part = torch.stack([(w * var).sum(), w.sum(), valid.sum().to(torch.float64)])
        if group is not None:
            # The two scalars of the pooled variance (+ the valid-class count, for logging).
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        pooled = torch.where(part[1] > 0, part[0] / part[1].clamp(min=1e-300), torch.zeros_like(part[0]))
        gap = pooled - var
        perturb = valid & (gap > 0)
        if self.cfg.mode == "vanilla":
            perturb = perturb & ~head                     # head classes are never perturbed
        part2 = torch.stack([(gap * perturb).sum(), perturb.sum().to(torch.float64)])
        if group is not None:
            # Mean gap over perturbed classes (the "uniform" control) and their count.
            dist.all_reduce(part2, op=dist.ReduceOp.SUM, group=group)
        uniform = torch.where(part2[1] > 0, part2[0] / part2[1].clamp(min=1), torch.zeros_like(part2[0]))
        if self.cfg.control == "uniform":
            std = torch.sqrt(uniform) * valid
        else:
            std = torch.sqrt(gap.clamp(min=0)) * perturb
        self.class_std[:-1] = std.float()
        self.globals.copy_(torch.stack([pooled, uniform, part[2], part2[1]]))

    # ---- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
        """Centre + angle-memory update from the global batch; O(B log B + B * D), no host sync.

        feats [N, D] the gathered (replicated) embeddings, labels [N] global class ids.
        """
        f = F.normalize(feats.detach().float(), dim=1)
        n = f.shape[0]
        c = self.num_local
        local = (labels >= self.start) & (labels < self.start + c)
        cls = torch.where(local, labels - self.start, torch.full_like(labels, c))
        # Sort so each class is one segment; a segment id per sample bounded by N (fixed shapes).
        cls, order = torch.sort(cls, stable=True)
        f = f[order]
        new = torch.ones_like(cls, dtype=torch.bool)
        new[1:] = cls[1:] != cls[:-1]
        seg = torch.cumsum(new.to(torch.int64), 0) - 1
        seg_sum = torch.zeros_like(f).index_add_(0, seg, f)
        seg_cnt = torch.zeros(n, dtype=torch.int64, device=f.device).index_add_(0, seg, torch.ones_like(seg))
        cnt = seg_cnt[seg]
        batch_mean = seg_sum[seg] / cnt.unsqueeze(1).to(f.dtype)
        # Centre: c <- c + lr * (batch mean - c); first sight takes the batch mean.
        old = self.centers[cls]
        center = torch.where(self.seen[cls].unsqueeze(1), old + self.cfg.center_lr * (batch_mean - old),
                             batch_mean)
        self.centers[cls] = center                        # duplicates write identical rows
        self.seen.index_fill_(0, cls, True)
        # Angle to the updated centre; clamp because rounding can push |cos| past 1.
        beta = torch.acos(torch.clamp((f * F.normalize(center, dim=1)).sum(1), -1.0, 1.0))
        self._write_ring(cls, beta, cnt, seg_cnt, seg, local[order])
        self.refresh(group)

    def _write_ring(self, cls, beta, cnt, seg_cnt, seg, is_local) -> None:
        """Append each local sample's angle to its class ring; only the last S_i of a class's
        samples in this batch are kept so that slots within one write are distinct."""
        n = cls.shape[0]
        seg_start = (torch.cumsum(seg_cnt, 0) - seg_cnt)[seg]
        pos = torch.arange(n, device=cls.device) - seg_start     # rank inside its class
        size = self.mem_size[cls]
        skip = (cnt - size).clamp(min=0)
        write = is_local & (pos >= skip)
        j = pos - skip
        before = self.count[cls]
        slot = self.mem_offset[cls] + torch.remainder(before + j, size)
        slot = torch.where(write, slot, torch.full_like(slot, self.mem_total))
        old = self.memory[slot].to(torch.float64)
        had_old = write & (before + j >= size)
        self.memory[slot] = beta                         # scratch slot takes the skipped ones
        b64 = beta.to(torch.float64)
        zero = torch.zeros_like(b64)
        d_sum = torch.where(write, b64, zero) - torch.where(had_old, old, zero)
        d_sq = torch.where(write, b64 * b64, zero) - torch.where(had_old, old * old, zero)
        self.sum.index_add_(0, cls, d_sum)
        self.sumsq.index_add_(0, cls, d_sq)
        self.count.index_add_(0, cls, write.to(torch.int64))

    # ---- per step ---------------------------------------------------------------------------
    def batch_std(self, labels: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        """std of every sample's feature cloud, [N] replicated: the owner fills its rows, zeros
        elsewhere, and one all-reduce (sum) of this global-batch vector completes it."""
        c = self.num_local
        local = (labels >= self.start) & (labels < self.start + c)
        cls = torch.where(local, labels - self.start, torch.full_like(labels, c))
        std = self.class_std[cls] * local
        if group is not None:
            dist.all_reduce(std, op=dist.ReduceOp.SUM, group=group)
        return std

    def summary(self) -> Dict[str, float]:
        """Host-side numbers for logging (syncs; call at log time, not per step)."""
        g = self.globals.tolist()
        return {"pooled_var": g[0], "uniform_var": g[1], "num_valid": int(g[2]),
                "num_perturbed": int(g[3])}

    # ---- checkpoints ------------------------------------------------------------------------
    def export(self) -> Dict[str, torch.Tensor]:
        """Per-class tensors without the scratch slot (rows = owned classes), on CPU."""
        return {"centers": self.centers[:-1].cpu().clone(), "seen": self.seen[:-1].cpu().clone(),
                "memory": self.memory[:-1].cpu().clone(), "memory_size": self.mem_size[:-1].cpu().clone(),
                "count": self.count[:-1].cpu().clone(), "sum": self.sum[:-1].cpu().clone(),
                "sumsq": self.sumsq[:-1].cpu().clone(), "class_std": self.class_std[:-1].cpu().clone()}

    def load(self, state: Dict[str, torch.Tensor], globals_: torch.Tensor, where: str) -> None:
        """Inverse of export; `where` names the checkpoint in errors."""
        size = state["memory_size"].to(self.mem_size.device)
        if size.shape != self.mem_size[:-1].shape or not torch.equal(size, self.mem_size[:-1]):
            raise ValueError(f"{where}: LEAP memory sizes differ from this run's (class counts or "
                             "leap.memory_factor changed); resume with the same data and config")
        for key in ("centers", "seen", "count", "sum", "sumsq", "class_std"):
            getattr(self, key)[:-1].copy_(state[key])
        self.memory[:-1].copy_(state["memory"])
        self.globals.copy_(globals_.to(torch.float64))
