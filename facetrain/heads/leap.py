"""LEAP state of one rank's class block: class centres, angle memory, statistics, feature-cloud std.

Everything per class lives on the rank that owns the class (docs/leap.md, "Sharding"). Buffers
carry one extra scratch slot at the end (row C_local, memory slot M) so that samples of classes
owned elsewhere can be routed there instead of being filtered out, which would need a host sync
(nonzero) every update.

State follows the paper (docs/leap.md, "State"): `record` writes the angle of every training
sample of a class that has a centre, measured to the centre as it stands before this batch's
update (Eq. 3, 5); `update_centers` moves the centres (Eq. 4) on update steps only; `refresh`
recomputes the statistics and each class's cloud after a centre update.

Variance: sigma_i^2 is the unbiased variance (n - 1) of class i's buffer, valid once it holds 2
angles; Eq. 9's (K_i - 1) weights are the classical pooled-variance weights for it.

Controls (leap.control; facetrain/heads/leap_controls.py): "none" is LEAP; "null" computes
everything and applies nothing; "uniform" and "shuffled" are untargeted clouds with LEAP's
expected per-sample noise variance; "uniform_meangap" is the earlier, unmatched uniform control
(the mean gap over the perturbed classes, for every valid class). leap.width_scale multiplies
every class's variance afterwards, so matched controls stay matched.

Communication: per step one all-reduce of a global-batch-length vector (`batch_std`); per
refresh two tiny all-reduces (3 and 4 scalars), plus one C-long vector for "shuffled".
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facetrain.config import LeapConfig
from facetrain.heads import leap_controls
from facetrain.heads.partition import route_to_block


def memory_sizes(counts: torch.Tensor, memory_factor: float) -> torch.Tensor:
    """S_i = ceil(K_i * P), at least 1 ([C] int64). The 1e-9 keeps 10 * 0.3 at 3, not 4."""
    s = torch.ceil(counts.to(torch.float64) * memory_factor - 1e-9).to(torch.int64)
    return s.clamp(min=1)


# The per-class state LeapState.snapshot writes and PartialFC.reshard re-splits: one row per owned
# class each (ROW_KEYS and SIZE_KEY), and the ring buffers (RAGGED_KEY), flat, SIZE_KEY per class.
ROW_KEYS = ("centers", "seen", "count", "sum", "sumsq", "class_std")
SIZE_KEY = "memory_size"
RAGGED_KEY = "memory"

# Replicated per-run scalars (same on every rank), in `LeapState.globals`.
GLOBALS = ("pooled_var", "meangap_var", "num_valid", "num_perturbed", "noise_var",
           "target_noise_var", "refreshes")


class LeapState(torch.nn.Module):
    """Centres, ring-buffer angle memory and statistics for classes [start, start + C_local).

    class_counts: [C_local] K_i of the owned classes; global_counts: [C] K_i of every class
    (needed by the shuffled control; defaults to class_counts, right for a single rank);
    seed: the shuffled control's permutation stream. Buffers (all split by class block):
    centers [C+1, D], seen [C+1] (the class has a centre), memory [M+1] (class i's ring is
    memory[off_i : off_i + S_i]), count [C+1] angles ever written, sum/sumsq [C+1] float64
    running sums over the ring, class_std [C+1] the feature-cloud std of each class (0 = not
    perturbed). Replicated scalars: `globals` (names in GLOBALS).
    """

    def __init__(self, class_counts: torch.Tensor, start: int, embedding_size: int,
                 cfg: LeapConfig, device: torch.device,
                 global_counts: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.start = start
        self.seed = int(seed)
        counts = class_counts.to(torch.int64).cpu()
        self.num_local = int(counts.numel())
        sizes = memory_sizes(counts, cfg.memory_factor)
        c1 = self.num_local + 1
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
        self.mem_total = int(offsets[-1])
        self.register_buffer("counts", counts.to(device), persistent=False)
        all_counts = counts if global_counts is None else global_counts.to(torch.int64).cpu()
        self.register_buffer("all_counts", all_counts.to(device), persistent=False)
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
        self.register_buffer("globals", torch.zeros(len(GLOBALS), dtype=torch.float64, device=device))
        self.refreshes = 0                # host copy of globals["refreshes"] (seeds "shuffled")
        # Realised noise since the last summary: sum over steps of the batch's mean std^2, steps,
        # this rank's sum of |alpha| at its target logits and their count (logging only).
        self.register_buffer("realised", torch.zeros(4, dtype=torch.float64, device=device),
                             persistent=False)

    # ---- statistics -------------------------------------------------------------------------
    def stats(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, var, valid) of the owned classes, [C_local] each (fp32), from the running sums."""
        mean, var, valid = self._stats64()
        return mean.float(), var.float(), valid

    def _stats64(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = torch.minimum(self.count, self.mem_size)[:-1].to(torch.float64)
        s, ss = self.sum[:-1], self.sumsq[:-1]
        valid = n >= 2
        mean = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
        var = torch.where(valid, (ss - s * s / n.clamp(min=1)) / (n - 1).clamp(min=1), torch.zeros_like(s))
        return mean, var.clamp(min=0), valid

    def refresh(self, group: Optional[dist.ProcessGroup]) -> None:
        """Recompute sigma^2 (Eq. 9 or Eq. 6), LEAP's per-class gap and the applied cloud of
        every owned class (control, then width_scale). O(C_local) once per update (O(C) for
        the shuffled control), next to the O(B * C_local) logit block of every step."""
        _, var, valid = self._stats64()
        k = self.counts.to(torch.float64)
        # The frequent classes (the paper's "head" classes; here "head" is the classifier).
        frequent = self.counts > self.cfg.head_threshold
        if self.cfg.mode == "vanilla":
            w = (frequent & valid).to(torch.float64)      # Eq. 6: plain mean over frequent classes
        else:
            w = (k - 1).clamp(min=0) * valid              # Eq. 9: (K_i - 1) weights
        part = torch.stack([(w * var).sum(), w.sum(), valid.sum().to(torch.float64)])
        if group is not None:
            # The two scalars of the pooled variance (+ the valid-class count, for logging).
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        pooled = torch.where(part[1] > 0, part[0] / part[1].clamp(min=1e-300), torch.zeros_like(part[0]))
        perturb = valid & (pooled - var > 0)
        if self.cfg.mode == "vanilla":
            perturb = perturb & ~frequent                 # frequent classes are never perturbed
        gap = (pooled - var).clamp(min=0) * perturb       # LEAP's variance per class
        part2 = torch.stack([(k * gap).sum(), (k * valid).sum(), gap.sum(),
                             perturb.sum().to(torch.float64)])
        if group is not None:
            # T = sum K_i gap_i (the strength controls match), sum of K_i over valid classes,
            # and the sum and count of gaps (the unmatched "uniform_meangap" control).
            dist.all_reduce(part2, op=dist.ReduceOp.SUM, group=group)
        target, k_valid, gap_sum, n_perturbed = part2.unbind()
        meangap = torch.where(n_perturbed > 0, gap_sum / n_perturbed.clamp(min=1), torch.zeros_like(gap_sum))
        control = self.cfg.control
        if control == "uniform":
            cls_var = leap_controls.matched_uniform(valid, target, k_valid)
        elif control == "shuffled":
            cls_var = leap_controls.shuffled(gap, valid, self.start, self.all_counts, target,
                                             self.seed, self.refreshes, group)
        elif control == "uniform_meangap":
            cls_var = meangap * valid
        else:
            cls_var = gap                                 # LEAP itself (and "null", unapplied)
        lam = self.cfg.width_scale
        self.class_std[:-1] = torch.sqrt(lam * cls_var).float()
        per_sample = torch.where(k_valid > 0, lam * target / k_valid.clamp(min=1e-300),
                                 torch.zeros_like(target))
        applied = {"null": torch.zeros_like(target), "uniform_meangap": lam * meangap}.get(
            control, per_sample)
        self.globals.copy_(torch.stack([pooled, meangap, part[2], n_perturbed, applied, per_sample,
                                        torch.full_like(pooled, self.refreshes + 1)]))
        self.refreshes += 1

    # ---- updates ----------------------------------------------------------------------------
    def _segments(self, labels: torch.Tensor):
        """Sort the batch by local class (others to the scratch row): (cls, order, seg, seg_cnt,
        is_local) with one segment per class, fixed shapes (segment ids bounded by N)."""
        cls, local = route_to_block(labels, self.start, self.num_local)
        cls, order = torch.sort(cls, stable=True)         # stable: batch order inside a class
        new = torch.ones_like(cls, dtype=torch.bool)
        new[1:] = cls[1:] != cls[:-1]
        seg = torch.cumsum(new.to(torch.int64), 0) - 1
        seg_cnt = torch.zeros(cls.shape[0], dtype=torch.int64, device=cls.device).index_add_(
            0, seg, torch.ones_like(seg))
        return cls, order, seg, seg_cnt, local[order]

    @torch.no_grad()
    def record(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Write every local sample's angle to its class centre into the class ring (Eq. 3, 5),
        measured before any centre update of this batch; a class with no centre yet records
        nothing. O(B log B + B * D), no host sync. feats [N, D] gathered, labels [N] global."""
        f = F.normalize(feats.detach().float(), dim=1)
        cls, order, seg, seg_cnt, is_local = self._segments(labels)
        f = f[order]
        # Clamp because rounding can push |cos| past 1.
        beta = torch.acos(torch.clamp((f * F.normalize(self.centers[cls], dim=1)).sum(1), -1.0, 1.0))
        self._write_ring(cls, beta, seg_cnt[seg], seg_cnt, seg, is_local & self.seen[cls])

    @torch.no_grad()
    def update_centers(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """c <- c + center_lr * (batch mean - c) for every local class in the batch (Eq. 4, in
        its centre-loss reading); a class seen for the first time takes the batch mean."""
        f = F.normalize(feats.detach().float(), dim=1)
        cls, order, seg, _, _ = self._segments(labels)
        f = f[order]
        seg_sum = torch.zeros_like(f).index_add_(0, seg, f)
        ones = torch.ones_like(seg, dtype=f.dtype)
        seg_cnt = torch.zeros(f.shape[0], device=f.device).index_add_(0, seg, ones)
        batch_mean = seg_sum[seg] / seg_cnt[seg].unsqueeze(1)
        old = self.centers[cls]
        center = torch.where(self.seen[cls].unsqueeze(1), old + self.cfg.center_lr * (batch_mean - old),
                             batch_mean)
        self.centers[cls] = center                        # duplicates write identical rows
        self.seen.index_fill_(0, cls, True)

    def _write_ring(self, cls, beta, cnt, seg_cnt, seg, write_ok) -> None:
        """Append each writable sample's angle to its class ring; only the last S_i of a class's
        samples in this batch are kept so that slots within one write are distinct. Writability
        is per class (local and has a centre), so in-class positions need no recount."""
        n = cls.shape[0]
        seg_start = (torch.cumsum(seg_cnt, 0) - seg_cnt)[seg]
        pos = torch.arange(n, device=cls.device) - seg_start     # rank inside its class
        size = self.mem_size[cls]
        skip = (cnt - size).clamp(min=0)
        write = write_ok & (pos >= skip)
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
        cls, local = route_to_block(labels, self.start, self.num_local)
        std = self.class_std[cls] * local
        if group is not None and dist.get_world_size(group) > 1:    # a 1-rank sum is a no-op
            dist.all_reduce(std, op=dist.ReduceOp.SUM, group=group)
        return std

    @torch.no_grad()
    def observe(self, std: torch.Tensor, alpha_t: torch.Tensor, is_local: torch.Tensor,
                applied: bool) -> None:
        """Accumulate the realised noise of one perturbed step (no host sync): std [N] the
        replicated per-sample std, alpha_t [N] each sample's angle at its target logit (valid
        where is_local [N]); applied=False (the null control) records zeros."""
        z = torch.zeros((), dtype=torch.float64, device=std.device)
        var = (std.to(torch.float64) ** 2).mean() if applied else z
        a = (alpha_t.to(torch.float64).abs() * is_local).sum() if applied else z
        self.realised += torch.stack([var, z + 1, a, is_local.sum().to(torch.float64)])

    def summary(self, group: Optional[dist.ProcessGroup]) -> Dict[str, float]:
        """Host-side numbers for logging; a collective (every rank must call it) that syncs
        with the host, so call it at log time. The realised numbers cover the steps since the
        previous call and are reset: batch_noise_var is the mean over those steps' samples of
        their cloud variance, mean_abs_alpha the mean |alpha| at the samples' target logits
        (both 0 when nothing was perturbed)."""
        real = self.realised.clone()
        if group is not None:
            # Only the |alpha| sums are per rank; the batch variance is already replicated.
            dist.all_reduce(real[2:], op=dist.ReduceOp.SUM, group=group)
        self.realised.zero_()
        r = real.tolist()
        g = dict(zip(GLOBALS, self.globals.tolist()))
        out: Dict[str, float] = {k: v for k, v in g.items() if k != "refreshes"}
        for key in ("num_valid", "num_perturbed"):
            out[key] = int(out[key])
        out["batch_noise_var"] = r[0] / r[1] if r[1] > 0 else 0.0
        out["mean_abs_alpha"] = r[2] / r[3] if r[3] > 0 else 0.0
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, torch.Tensor]:
        """Per-class tensors without the scratch slot (rows = owned classes), on CPU, for the
        classifier's checkpoint state (not an export: that word is the backbone file's)."""
        out = {key: getattr(self, key)[:-1].cpu().clone() for key in ROW_KEYS}
        out[RAGGED_KEY] = self.memory[:-1].cpu().clone()
        out[SIZE_KEY] = self.mem_size[:-1].cpu().clone()
        return out

    def load(self, state: Dict[str, torch.Tensor], globals_: torch.Tensor, where: str) -> None:
        """Inverse of snapshot; `where` names the checkpoint in errors."""
        size = state[SIZE_KEY].to(self.mem_size.device)
        if size.shape != self.mem_size[:-1].shape or not torch.equal(size, self.mem_size[:-1]):
            raise ValueError(f"{where}: LEAP memory sizes differ from this run's (class counts or "
                             "leap.memory_factor changed); resume with the same data and config")
        for key in ROW_KEYS:
            getattr(self, key)[:-1].copy_(state[key])
        self.memory[:-1].copy_(state[RAGGED_KEY])
        # Checkpoints from before the matched controls hold only the first 4 scalars.
        g = torch.zeros(len(GLOBALS), dtype=torch.float64)
        old = globals_.detach().cpu().to(torch.float64).reshape(-1)[:len(GLOBALS)]
        g[:old.numel()] = old
        self.globals.copy_(g)
        self.refreshes = int(g[GLOBALS.index("refreshes")])
