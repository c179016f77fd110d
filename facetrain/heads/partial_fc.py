"""Model-parallel classifier (partial FC) with margins and LEAP applied per class block.

Per step: all-gather embeddings (with gradient) and labels over ctx.group -> this rank's class
block (optionally a sampled subset of it) -> cosine logits (matmul may run under autocast; the
rest is fp32) -> LEAP angles for samples whose class has a feature cloud -> the margin kind
of head.margin.kind (facetrain/heads/kinds/, docs/heads.md) on the targets this rank owns ->
logit adjustment -> distributed softmax cross-entropy (mean over the global batch,
replicated). Gradients equal a single-process full softmax on the global batch: each rank
back-propagates only its own block, and dist.all_gather_with_grad sums the embedding partials.

Class sampling (head.sample_rate < 1, training only): each step every rank keeps every class of
its block that appears in the global batch plus seeded random negatives, k = min(C_local,
max(ceil(rate * C_local), N)) rows in total (fixed k, so no host sync; N >= the number of
positives). With head.update_rows=all the weight's .grad is dense with zeros in rows not
sampled and the optimizer still applies weight decay and momentum to those rows (as
InsightFace's PartialFC_V2 does); with `sampled` the gradient is a sparse tensor of the k rows
and `facetrain.optim.SampledRowSGD` updates only them.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from facetrain.config import HeadConfig, LeapConfig
from facetrain.dist import DistContext, all_gather_no_grad, all_gather_with_grad
from facetrain.heads.class_weights import class_weight_table
from facetrain.heads.dist_softmax import dist_softmax_cross_entropy
from facetrain.heads.feature_cloud import Cloud
from facetrain.heads.kinds import build_margin
from facetrain.heads.leap import GLOBALS, RAGGED_KEY, ROW_KEYS, SIZE_KEY, LeapState
from facetrain.heads.margins import StepInputs, margin_logits
from facetrain.heads.noise import noise_keys
from facetrain.heads.partition import (check_contiguous, class_range, logit_column,
                                        partition_bounds, reshard_optimizer_state, reshard_tree,
                                        route_to_block)

FORMAT = "facetrain.partial_fc/1"
_INIT_CHUNK = 1 << 16


def init_rows(start: int, end: int, dim: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Rows [start, end) of a N(0, std^2) [C, D] matrix that does not depend on the world size:
    row chunks of 65,536 are drawn from their own CPU generator, so each rank draws only the
    chunks it overlaps."""
    out = torch.empty(end - start, dim)
    for chunk in range(start // _INIT_CHUNK, (end - 1) // _INIT_CHUNK + 1 if end > start else 0):
        lo, hi = chunk * _INIT_CHUNK, (chunk + 1) * _INIT_CHUNK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        block = torch.randn(_INIT_CHUNK, dim, generator=gen) * std
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = block[a - lo:b - lo]
    return out


class _SampledRows(torch.autograd.Function):
    """weight[index] whose gradient is a sparse [C, D] tensor of the k sampled rows.

    `index` is sorted and unique (PartialFC._sample), so the gradient is built already
    coalesced: the optimizer reads its rows with no `coalesce()` (a host sync on CUDA)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = weight.shape
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        # check_invariants=False: sorted unique in-range rows by construction (and no sync).
        return torch.sparse_coo_tensor(index.unsqueeze(0), grad.contiguous(), ctx.shape,
                                       is_coalesced=True, check_invariants=False), None


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _coalesced_flag_hook(head: "PartialFC"):
    """The weight's post-accumulate hook, holding the head only weakly. autograd keeps a tensor's
    hooks from C++, where Python's cycle collector cannot see them: a bound method there (head ->
    weight -> hook -> head) made every head with sampled-row updates immortal, and with it its
    DistContext and process group, whose gloo threads then died in interpreter finalization
    ("terminate called without an active exception", SIGABRT at exit)."""
    ref = weakref.ref(head)

    def hook(weight: torch.Tensor) -> None:
        alive = ref()
        if alive is not None:
            alive._keep_rows_coalesced(weight)
    return hook


class PartialFC(torch.nn.Module):
    """Classifier block for classes [start, end) of this rank in ctx.group.

    weight: nn.Parameter [C_local, D] on ctx.device (contiguous class blocks).
    class_counts: GLOBAL K_i, [C]. LEAP state (if leap_cfg.mode != off) lives in self.leap.
    grad_accum: training forwards per optimizer step (optim.grad_accum); LEAP's
    update_interval counts optimizer steps, so the head must know how many forwards make one.
    """

    def __init__(self, embedding_size: int, class_counts: np.ndarray | torch.Tensor,
                 head_cfg: HeadConfig, leap_cfg: LeapConfig, ctx: DistContext, seed: int = 0,
                 grad_accum: int = 1):
        super().__init__()
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.int64).reshape(-1)
        self.num_classes = int(counts.numel())
        self.embedding_size = embedding_size
        self.head_cfg, self.leap_cfg, self.ctx = head_cfg, leap_cfg, ctx
        self.start, self.end = class_range(self.num_classes, ctx.world_size, ctx.rank)
        self.num_local = self.end - self.start
        # K sub-centres per class (head.margin.subcenters, kind subcenter): weight [C_local, K, D],
        # the class stays dim 0 so sampling, checkpoints and optimizer state split by class.
        k = head_cfg.margin.subcenters
        rows = init_rows(self.start * k, self.end * k, embedding_size, seed)
        self.weight = torch.nn.Parameter(
            (rows if k == 1 else rows.view(self.num_local, k, embedding_size)).to(ctx.device))
        self.leap = None if leap_cfg.mode == "off" else LeapState(
            counts[self.start:self.end], self.start, embedding_size, leap_cfg, ctx.device,
            global_counts=counts, seed=seed)
        # Class-balanced loss (head.class_balance_beta > 0): a weight per global class, [C].
        self.class_weight = class_weight_table(counts.numpy(), head_cfg.class_balance_beta,
                                               ctx.device)
        # The margin kind (head.margin.kind, facetrain/heads/kinds/) and its running statistics.
        self.margin = build_margin(head_cfg.margin, ctx.device)
        self.margin.set_class_counts(counts.to(ctx.device))
        # Logit adjustment: tau * log prior of this block's classes, [C_local] (None = off).
        self.log_prior = None
        if head_cfg.logit_adjust_tau > 0:
            if int(counts.sum()) <= 0:
                raise ValueError(f"head.logit_adjust_tau={head_cfg.logit_adjust_tau} needs the "
                                 "class counts K_i, but the training data reports none")
            # A class with no image (a gap in the label space) counts as one, not log 0.
            prior = counts.clamp(min=1).double() / counts.clamp(min=1).sum()
            self.log_prior = (head_cfg.logit_adjust_tau * prior.log()).float()[
                self.start:self.end].to(ctx.device)
        # Class sampling: a stream per rank. LEAP angles: keyed on (draw, sample, global class),
        # the same on every rank and for every world size (facetrain/heads/noise.py).
        self._sample_gen = _generator(ctx.device, seed * 7919 + ctx.rank + 1)
        self._noise_seed = seed * 7919 + 104729
        self.register_buffer("noise_counter", torch.zeros((), dtype=torch.int64, device=ctx.device),
                             persistent=False)
        self.epoch = 0
        if grad_accum < 1:
            raise ValueError(f"PartialFC: grad_accum must be >= 1; got {grad_accum}")
        self.grad_accum = int(grad_accum)
        self.calls = 0                       # training forwards seen with LEAP
        self.leap_steps = 0                  # optimizer steps seen (drives update_interval)
        self._micro = 0                      # forwards of the current optimizer step
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []   # its update batches
        self.last_sample_index: torch.Tensor | None = None   # [k] local rows of the last step
        if head_cfg.update_rows == "sampled":
            self.weight.register_post_accumulate_grad_hook(_coalesced_flag_hook(self))

    # ---- public -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """LEAP perturbs only from leap_cfg.start_epoch on."""
        self.epoch = int(epoch)

    @property
    def perturbing(self) -> bool:
        return self.training and self.leap is not None and self.epoch >= self.leap_cfg.start_epoch

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings [B, D] this rank's (not normalised), labels [B] int64 global ids ->
        scalar mean CE over the global batch (replicated over ctx.group)."""
        group = self._group()
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC.forward: embeddings must be [B, {self.embedding_size}]; "
                             f"got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"PartialFC.forward: labels must be [{embeddings.shape[0]}]; got "
                             f"{tuple(labels.shape)}")
        emb = all_gather_with_grad(embeddings, group)
        lab = all_gather_no_grad(labels.to(torch.int64), group)
        logits, col, local = self.block_logits(emb, lab)
        weight = None
        if self.class_weight is not None and self.epoch >= self.head_cfg.class_balance_start_epoch:
            weight = self.class_weight[lab]
        loss = dist_softmax_cross_entropy(logits, col, local, group, weight)
        extra = self.margin.extra_loss(self.ctx.world_size)
        if extra is not None:
            loss = loss + extra
        if self.training and self.leap is not None:
            self._leap_iteration(emb.detach(), lab, group)
        return loss

    def _leap_iteration(self, emb: torch.Tensor, lab: torch.Tensor, group) -> None:
        """LEAP bookkeeping of one training forward (docs/leap.md, "State"): every forward
        records its angles (to the centres as they stand); on an update step (every
        update_interval optimizer steps) the step's micro-batches are kept and, after the last
        one, move the centres as one batch and the statistics are refreshed."""
        self.leap.record(emb, lab)
        update = self.leap_steps % self.leap_cfg.update_interval == 0
        if update:
            self._pending.append((emb, lab))
        self.calls += 1
        self._micro += 1
        if self._micro < self.grad_accum:
            return
        if update:
            feats = torch.cat([e for e, _ in self._pending])
            labels = torch.cat([l for _, l in self._pending])
            self.leap.update_centers(feats, labels)
            self.leap.refresh(group)
        self._pending, self._micro = [], 0
        self.leap_steps += 1

    def block_logits(self, emb: torch.Tensor, lab: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scaled logits of this rank's block for the gathered batch: ([N, C_s] fp32, target
        column [N], is_local [N]). C_s = C_local, or k sampled rows in training with sampling."""
        row, local = route_to_block(lab, self.start, self.num_local)
        col = logit_column(row, local)
        weight = self.weight
        sampled = self.training and self.head_cfg.sample_rate < 1.0
        index = None
        if sampled:
            index = self._sample(col, local, lab.shape[0])
            # The gradient lands only on the sampled rows: dense (zeros elsewhere) or sparse.
            if self.head_cfg.update_rows == "sampled":
                weight = _SampledRows.apply(weight, index)
            else:
                weight = weight[index]
            col = logit_column(torch.searchsorted(index, col).clamp(max=index.shape[0] - 1), local)
        if weight.dim() == 3:                 # sub-centres: best of each class's K
            cos = F.linear(F.normalize(emb, dim=1),
                           F.normalize(weight.reshape(-1, self.embedding_size), dim=1)).float()
            cos = self.margin.class_cosines(cos)
        else:
            cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1)).float()
        if self.head_cfg.interclass_filter > 0:
            cos = self._filter_interclass(cos, col, local)
        cloud = None
        # One draw of the counter-based stream per training forward that uses it (LEAP's angles,
        # a kind's per-sample values): all of them read the counter before it is bumped.
        counter = self.noise_counter
        if self.training and self.margin.uses_noise:
            counter = self.noise_counter.clone()
            if not self.perturbing:
                self.noise_counter += 1
        if self.perturbing:
            std = self.leap.batch_std(lab, self._group())
            ids = None
            if self.leap_cfg.alpha_granularity == "logit":
                ids = index + self.start if sampled else torch.arange(
                    self.start, self.end, device=cos.device)
            keys = noise_keys(self._noise_seed, self.noise_counter, lab.shape[0], ids)
            self.noise_counter += 1           # "null" advances the stream the same way, unused
            applied = self.leap_cfg.control != "null"
            if applied:
                cloud = Cloud(std.unsqueeze(1), *keys)
            alpha_t = cloud.target_alpha(col, cos.shape[1]) if applied else std
            self.leap.observe(std, alpha_t, local, applied)
        # The backbone's embeddings arrive un-normalised: their norms, where a kind reads them.
        norms = emb.float().norm(dim=1) if self.margin.uses_norms else None
        inputs = StepInputs(lab, norms, counter, self._noise_seed, self._group(), self.training)
        logits = margin_logits(cos, col, local, self.margin, cloud, inputs)
        if self.log_prior is not None:        # logit adjustment, after the scale
            prior = self.log_prior if index is None else self.log_prior[index]
            logits = logits + prior.unsqueeze(0)
        return logits, col, local

    def _filter_interclass(self, cos: torch.Tensor, col: torch.Tensor, local: torch.Tensor
                           ) -> torch.Tensor:
        """Partial FC's inter-class filtering: a non-target cosine above head.interclass_filter
        becomes 0 (no gradient), before margins and LEAP; the target never is.

        Written as an in-place multiply by a 0/1 float mask (`cos` is the fresh matmul output,
        which no backward saves): three passes over the block (compare, multiply, and the
        gradient's multiply) where masked_fill took two slow masked passes and a new buffer (on
        one CPU thread the filter cost ~3x as much). The values are the same bit for bit: a
        filtered cosine is > 0, so cos * 0 = +0, and cos * 1 = cos."""
        keep = torch.le(cos.detach(), self.head_cfg.interclass_filter,
                        out=torch.empty_like(cos))
        tgt = col.view(-1, 1)
        # A local target is always kept; rows of other ranks' classes keep column 0 as it is.
        keep.scatter_(1, tgt, torch.maximum(keep.gather(1, tgt), local.view(-1, 1).to(keep.dtype)))
        return cos.mul_(keep)

    def leap_summary(self) -> Dict[str, float]:
        """Global LEAP numbers (replicated): statistics, the expected per-sample noise variance
        of the applied cloud (`noise_var`) and of LEAP's own (`target_noise_var`, what controls
        are matched to), and the realised noise since the previous call (`batch_noise_var`,
        `mean_abs_alpha`). A collective that syncs with the host: call it on every rank, at
        log time."""
        if self.leap is None:
            return {**{k: 0.0 for k in GLOBALS if k != "refreshes"}, "num_valid": 0,
                    "num_perturbed": 0, "batch_noise_var": 0.0, "mean_abs_alpha": 0.0,
                    "active": False}
        return {**self.leap.summary(self.ctx.group), "active": self.perturbing}

    def class_stats(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(angular mean, variance, valid) of the owned classes, [C_local] each (this block)."""
        if self.leap is None:
            z = torch.zeros(self.num_local, device=self.weight.device)
            return z, z.clone(), torch.zeros_like(z, dtype=torch.bool)
        return self.leap.stats()

    # ---- checkpoints ------------------------------------------------------------------------
    # The head's checkpoint state is more than its tensors (class block, LEAP ring buffers,
    # counters, its sampling stream), so these two replace nn.Module's: a PartialFC is never a
    # submodule of another module, whose state_dict would call them with other arguments.
    def state_dict(self) -> Dict:  # type: ignore[override]
        """CPU copy of this class block: weights, LEAP state, class range, counters and the class
        sampling stream (the only random generator the head keeps; LEAP's angles are keyed by
        `noise_counter`)."""
        state = {"format": FORMAT, "num_classes": self.num_classes, "class_start": self.start,
                 "class_end": self.end, "embedding_size": self.embedding_size,
                 "weight": self.weight.detach().cpu().clone(), "calls": self.calls, "epoch": self.epoch,
                 "leap_steps": self.leap_steps,
                 "leap": None, "leap_globals": torch.zeros(len(GLOBALS), dtype=torch.float64),
                 # The sampling stream resumes exactly only on the same world size (reshard drops
                 # it); the LEAP noise counter is world-size independent.
                 "world_size": self.ctx.world_size, "noise_counter": int(self.noise_counter),
                 "noise_seed": self._noise_seed,
                 "rng": self._sample_gen.get_state(),
                 # The margin kind's running statistics: replicated, copied as is by reshard.
                 "margin_kind": self.head_cfg.margin.kind, "margin": self.margin.state_dict()}
        if self.leap is not None:
            state["leap"] = self.leap.snapshot()
            state["leap_globals"] = self.leap.globals.cpu().clone()
        return state

    def load_state_dict(self, states: Sequence[Dict], world_size: int  # type: ignore[override]
                        ) -> None:
        """Restore this rank's class block from `states[r]`, saved rank r's `state_dict()`, for
        `world_size` ranks now (this head's). With as many saved ranks as now only
        `states[rank]` is read (`states` may be a lazy sequence); otherwise every saved state is
        re-split by class (`reshard`) and this rank keeps its block."""
        if world_size != self.ctx.world_size:
            raise ValueError(f"PartialFC.load_state_dict: world_size={world_size} but this head "
                             f"is one of {self.ctx.world_size} ranks")
        if len(states) == world_size:
            self._load_own_state(states[self.ctx.rank])
        else:
            self._load_own_state(PartialFC.reshard(list(states), world_size)[self.ctx.rank])

    @staticmethod
    def reshard(states: List[Dict], world_size: int) -> List[Dict]:
        """Any N block states (in rank order) -> world_size block states with the same content."""
        if not states:
            raise ValueError("PartialFC.reshard: no block states given; pass every rank's "
                             "state_dict()")
        num_classes = states[0]["num_classes"]
        for i, s in enumerate(states):
            if s.get("format") != FORMAT or s["num_classes"] != num_classes:
                raise ValueError(f"PartialFC.reshard: block state {i} is not a {FORMAT} state of "
                                 f"{num_classes} classes; pass states from one checkpoint")
        check_contiguous([(s["class_start"], s["class_end"]) for s in states], num_classes)
        bounds = partition_bounds(num_classes, world_size)
        rows = reshard_tree(states, bounds, ["weight"], {})
        with_leap = all(s["leap"] is not None for s in states)
        leap = reshard_tree([s["leap"] for s in states], bounds, [*ROW_KEYS, SIZE_KEY],
                            {RAGGED_KEY: SIZE_KEY}) if with_leap else [None] * world_size
        same = len(states) == world_size
        return [{**{k: v for k, v in states[0].items() if k not in ("weight", "leap")},
                 "class_start": bounds[r], "class_end": bounds[r + 1], "weight": rows[r]["weight"],
                 "leap": leap[r], "leap_globals": states[0]["leap_globals"].clone(),
                 "world_size": world_size, "rng": states[r].get("rng") if same else None}
                for r in range(world_size)]

    # The optimizer over this block's rows is the engine's, but its state's layout is the
    # head's: a per-class row block of each parameter, re-split by class like the rows.
    def optimizer_state(self, opt: torch.optim.Optimizer) -> Dict[str, Any]:
        """`opt`'s state with what re-splitting it needs: each parameter's dim-0 size and this
        rank's class block (the keys every checkpoint has had)."""
        return {"head_optim": opt.state_dict(),
                "head_param_rows": [p.shape[0] for p in self.parameters()],
                "class_range": (int(self.start), int(self.end))}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, parts: Sequence[Dict[str, Any]],
                             world_size: int) -> None:
        """Load into `opt` the `optimizer_state` parts saved by len(parts) ranks: this rank's
        own part on the same world size (`parts` may be lazy), else every part re-split by
        class (`partition.reshard_optimizer_state`)."""
        if world_size != self.ctx.world_size:
            raise ValueError(f"PartialFC.load_optimizer_state: world_size={world_size} but this "
                             f"head is one of {self.ctx.world_size} ranks")
        if len(parts) == world_size:
            opt.load_state_dict(parts[self.ctx.rank]["head_optim"])
        else:
            opt.load_state_dict(reshard_optimizer_state(list(parts), world_size)[self.ctx.rank])

    def _load_own_state(self, state: Dict) -> None:
        """Load a state made for this rank's class range."""
        where = f"block state for classes [{state.get('class_start')}, {state.get('class_end')})"
        if state.get("format") != FORMAT:
            raise ValueError(f"{where}: format {state.get('format')!r} is not {FORMAT!r}")
        if state["num_classes"] != self.num_classes or state["embedding_size"] != self.embedding_size:
            raise ValueError(f"{where}: it holds {state['num_classes']} classes x "
                             f"{state['embedding_size']} dims but this head has {self.num_classes} x "
                             f"{self.embedding_size}; resume with the same data and model.embedding_size")
        if (state["class_start"], state["class_end"]) != (self.start, self.end):
            raise ValueError(f"{where}: this rank owns [{self.start}, {self.end}); the checkpoint "
                             "was written for another world size: pass every saved rank's state to "
                             "load_state_dict")
        if tuple(state["weight"].shape) != tuple(self.weight.shape):
            raise ValueError(f"{where}: its weight is {tuple(state['weight'].shape)} but this head's "
                             f"is {tuple(self.weight.shape)}; resume with the same "
                             "head.margin.subcenters (K) and model.embedding_size")
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        if self.leap is not None and state["leap"] is not None:
            self.leap.load(state["leap"], state["leap_globals"], where)
        self.calls, self.epoch = int(state["calls"]), int(state["epoch"])
        # Checkpoints are written between optimizer steps; older ones counted forwards only.
        self.leap_steps = int(state.get("leap_steps", self.calls // self.grad_accum))
        self._pending, self._micro = [], 0
        self.noise_counter.fill_(int(state["noise_counter"]))
        if "margin" in state and state.get("margin_kind") == self.head_cfg.margin.kind:
            self.margin.load_state_dict(state["margin"], where)
        # else: an older checkpoint, or one that trained another margin kind: this kind starts
        # its statistics afresh.
        self._noise_seed = int(state["noise_seed"])
        if state.get("rng") is not None and state.get("world_size") == self.ctx.world_size:
            self._sample_gen.set_state(state["rng"])

    # ---- internals --------------------------------------------------------------------------
    def _keep_rows_coalesced(self, weight: torch.Tensor) -> None:
        """autograd stores a fresh sparse .grad without the coalesced flag _SampledRows set.
        When .grad is exactly one step's rows (its indices ARE that step's sorted unique index),
        restore the flag; an accumulated gradient (several micro-batches, rows may repeat) keeps
        it unset and is coalesced by the optimizer."""
        g, index = weight.grad, self.last_sample_index
        if (g is not None and g.is_sparse and not g.is_coalesced() and index is not None
                and g._nnz() == index.numel()
                and g._indices().data_ptr() == index.data_ptr()):
            weight.grad = torch.sparse_coo_tensor(g._indices(), g._values(), g.shape,
                                                  is_coalesced=True, check_invariants=False)

    def _group(self):
        if self.ctx.group is None and self.ctx.world_size > 1:
            raise ValueError(f"PartialFC: ctx has world_size {self.ctx.world_size} but no process "
                             "group; build it with facetrain.dist.init_distributed")
        return self.ctx.group

    def _sample(self, col: torch.Tensor, local: torch.Tensor, n: int) -> torch.Tensor:
        """Sorted local row ids [k]: all positives of the global batch + random negatives."""
        c = self.num_local
        k = min(c, max(math.ceil(self.head_cfg.sample_rate * c), n))
        score = torch.rand(c + 1, generator=self._sample_gen, device=self.weight.device)
        # Positives get a score above any random one; samples of other ranks' classes hit the scratch slot.
        score.index_fill_(0, torch.where(local, col, torch.full_like(col, c)), 2.0)
        index = torch.topk(score[:c], k, sorted=False).indices.sort().values
        self.last_sample_index = index
        return index
