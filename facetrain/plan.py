"""Capacity planner: per-GPU memory and per-step communication of a facetrain run, from its shape.

The model follows the code, tensor by tensor (docs/scale.md explains each line and checks it
against memory measured on gloo ranks and against Partial FC's published figures):

- classifier (facetrain/heads/partial_fc.py): this rank's block of C_l = ceil(C / W) rows of D
  fp32 weights, its dense fp32 gradient (head.update_rows=all; `sampled`: k rows + indices), the
  optimizer state (SGD: momentum; Adam/AdamW: two moments), and per step the k used rows
  (gathered when sampling, L2-normalised always, a half-precision copy under AMP) with their
  gradient, and the N x k logits (N = global batch, k = sampled rows): cosine, softmax / logit
  gradient, cosine gradient and a temporary in fp32 (`LOGIT_COPIES`), a half copy under AMP;
- LEAP state (facetrain/heads/leap.py): per owned class the centre (D fp32), seen (bool), count,
  sum, sumsq, counts, ring size and offset (8 bytes each), class std (fp32); the angle memory
  sum_i ceil(K_i P) fp32; the global K_i table (C int64) on every rank;
- backbone: fp32 parameters, gradients, optimizer state, DDP's gradient buckets (W > 1) and the
  activations autograd saves, per sample (`ACTIVATION_MB`, measured with `--measure-activations`),
  halved under bf16/fp16;
- a fixed reserve for the CUDA context, cuDNN/cuBLAS workspaces and allocator slack.

Collectives are counted as bytes each GPU sends with ring algorithms: all-gather (W-1)/W of the
gathered tensor, all-reduce 2 (W-1)/W of the reduced one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

MB = 2 ** 20

# Trainable + frozen parameters at 112x112, 512-d (tests/unit/test_models_iresnet.py and
# test_models_arcface_layouts.py pin the same numbers).
BACKBONE_PARAMS = {"iresnet18": 24_025_600, "iresnet34": 34_139_328, "iresnet50": 43_590_848,
                   "iresnet100": 65_156_160, "iresnet200": 118_833_920, "mbf": 2_059_520,
                   "mbf_large": 6_314_880, "vit_t": 19_137_792, "vit_s": 76_023_296,
                   "vit_b": 113_833_472, "vit_l": 255_684_352}

# MB autograd keeps per sample for the backward pass at 112x112 in fp32, without / with
# model.activation_checkpointing (unique storages saved by one training forward, measured on CPU
# with torch.autograd.graph.saved_tensors_hooks by `python launch/plan.py --measure-activations`;
# ViTs in training mode with their default patch masking; mbf has no checkpointing option).
ACTIVATION_MB = {
    "iresnet18": (44.0, 12.3), "iresnet34": (58.4, 14.7), "iresnet50": (67.7, 16.2),
    "iresnet100": (106.8, 22.7), "iresnet200": (186.9, 36.0), "mbf": (43.2, 43.2),
    "mbf_large": (108.5, 108.5), "vit_t": (31.0, 2.2), "vit_s": (55.7, 4.3),
    "vit_b": (110.2, 7.3), "vit_l": (168.4, 11.4)}

# fp32 N x k buffers alive at the classifier's peak (the backward of the margin / feature cloud):
# the cosine, the softmax reused in place as the logit gradient, the cosine's gradient and one
# elementwise temporary.
LOGIT_COPIES = 4
# Eager (CPU) LEAP: the noise chain re-run in the backward holds about four more fp32 N x k
# temporaries (set from the full-softmax rows of docs/scale.md's gloo check); on CUDA it is one
# compiled kernel (facetrain/heads/fused.py) and holds none.
EAGER_LEAP_BYTES_PER_LOGIT = 16
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}
# Scratch copies of a parameter-sized tensor torch's foreach optimizers make during step():
# SGD with weight decay adds the decay into a new gradient; Adam/AdamW also build the denominator.
OPTIMIZER_SCRATCH = {"sgd": 1, "adam": 2, "adamw": 2}
HALF = {"fp32": False, "bf16": True, "fp16": True}


@dataclass(frozen=True)
class PlanInput:
    """One run's shape. batch_size is per GPU, gpu_memory_gb in GiB (what nvidia-smi calls GB)."""

    classes: int
    world_size: int = 8
    sample_rate: float = 1.0
    backbone: str = "iresnet50"
    batch_size: int = 128
    precision: str = "fp16"
    optimizer: str = "sgd"
    leap: str = "full"                 # off | vanilla | full
    gpu_memory_gb: float = 32.0
    embedding_size: int = 512
    images_per_class: float = 20.0     # mean K_i: LEAP's angle memory holds ceil(K_i * P) each
    memory_factor: float = 1.0         # leap.memory_factor (P)
    update_rows: str = "all"           # head.update_rows
    update_interval: int = 5           # leap.update_interval
    activation_checkpointing: bool = False
    reserve_mb: float = 1024.0         # CUDA context + library workspaces + allocator slack
    fused_leap: bool = True            # CUDA: LEAP's noise is one compiled kernel; CPU: eager

    def check(self) -> None:
        """ValueError naming the argument that is out of range."""
        if self.classes < 1 or self.world_size < 1 or self.batch_size < 1:
            raise ValueError("classes, world size and batch size must be >= 1")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1]; got {self.sample_rate}")
        if self.backbone not in BACKBONE_PARAMS:
            raise ValueError(f"backbone {self.backbone!r} is not planned; choose one of "
                             f"{', '.join(sorted(BACKBONE_PARAMS))}")
        for name, value, choices in (("precision", self.precision, HALF),
                                     ("optimizer", self.optimizer, OPTIMIZER_STATES),
                                     ("leap", self.leap, ("off", "vanilla", "full")),
                                     ("update_rows", self.update_rows, ("all", "sampled"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def local_classes(classes: int, world_size: int) -> int:
    """Rows of the largest class block (facetrain.heads.partition: the first C mod W ranks get one
    more)."""
    return -(-classes // world_size)


def sampled_rows(p: PlanInput) -> int:
    """k: rows of the block a training step uses (every positive kept, so at least N)."""
    c = local_classes(p.classes, p.world_size)
    if p.sample_rate >= 1.0:
        return c
    return min(c, max(math.ceil(p.sample_rate * c), p.batch_size * p.world_size))


def classifier_memory(p: PlanInput) -> Dict[str, float]:
    """Bytes per GPU of the classifier block's state (weights, gradient, optimizer state)."""
    c, d, k = local_classes(p.classes, p.world_size), p.embedding_size, sampled_rows(p)
    grad = c * d * 4 if p.update_rows == "all" else k * d * 4 + k * 8
    return {"classifier weights": c * d * 4,
            "classifier gradient": grad,
            "classifier optimizer state": OPTIMIZER_STATES[p.optimizer] * c * d * 4}


def classifier_step_memory(p: PlanInput) -> Dict[str, float]:
    """Bytes per GPU the classifier holds only during the forward/backward pass."""
    d, k = p.embedding_size, sampled_rows(p)
    n = p.batch_size * p.world_size
    half = HALF[p.precision]
    # At that moment: the rows the step uses (a gathered copy when sampling) and their
    # normalised copy (+ a half copy under AMP); their gradients come later, once it is freed.
    rows = k * d * 4 * (2 if p.sample_rate < 1.0 else 1) + (k * d * 2 if half else 0)
    eager = EAGER_LEAP_BYTES_PER_LOGIT if p.leap != "off" and not p.fused_leap else 0
    return {"used rows (gathered, normalised)": rows,
            "sampled logits and their gradient":
                n * k * (4 * LOGIT_COPIES + (2 if half else 0) + eager)}


def optimizer_step_memory(p: PlanInput) -> Dict[str, float]:
    """Bytes per GPU the optimizers' step() holds briefly (after the activations are freed)."""
    c, d = local_classes(p.classes, p.world_size), p.embedding_size
    rows = c if p.update_rows == "all" else sampled_rows(p)
    return {"classifier optimizer step scratch": OPTIMIZER_SCRATCH[p.optimizer] * rows * d * 4,
            "backbone optimizer step scratch":
                OPTIMIZER_SCRATCH[p.optimizer] * BACKBONE_PARAMS[p.backbone] * 4}


def leap_memory(p: PlanInput) -> Dict[str, float]:
    """Bytes per GPU of LEAP's state (0 with leap=off)."""
    if p.leap == "off":
        return {"LEAP centres": 0, "LEAP angle memory": 0, "LEAP statistics": 0}
    c, d = local_classes(p.classes, p.world_size), p.embedding_size
    slots = c * max(1, math.ceil(p.images_per_class * p.memory_factor - 1e-9)) + 1
    per_row = 1 + 8 * 3 + 8 * 2 + 4            # seen; count, sum, sumsq; ring size, offset; std
    # + the block's K_i (C_l int64), every class's K_i (C int64), 7 + 4 float64 run scalars
    return {"LEAP centres": (c + 1) * d * 4,
            "LEAP angle memory": slots * 4,
            "LEAP statistics": (c + 1) * per_row + c * 8 + p.classes * 8 + 11 * 8}


def backbone_memory(p: PlanInput) -> Dict[str, float]:
    """Bytes per GPU of the replicated backbone's state."""
    params = BACKBONE_PARAMS[p.backbone]
    return {"backbone parameters": params * 4,
            "backbone gradients (+ DDP buckets when W > 1)":
                params * 4 + (params * 4 if p.world_size > 1 else 0),
            "backbone optimizer state": OPTIMIZER_STATES[p.optimizer] * params * 4}


def activation_memory(p: PlanInput) -> float:
    """Bytes per GPU autograd keeps for the backbone's backward pass."""
    plain, ckpt = ACTIVATION_MB[p.backbone]
    per_sample = (ckpt if p.activation_checkpointing else plain) * MB
    return per_sample * p.batch_size * (0.5 if HALF[p.precision] else 1.0)


def memory(p: PlanInput) -> Dict[str, float]:
    """Every line of the per-GPU memory breakdown, bytes, plus `peak of the step` and `total`.

    State persists; the step's peak is the larger of two moments: the start of the backward
    pass (activations + classifier buffers) and the optimizer step (its scratch copies)."""
    p.check()
    out: Dict[str, float] = {}
    out.update(classifier_memory(p))
    out.update(leap_memory(p))
    out.update(backbone_memory(p))
    out["reserve (CUDA context, workspaces)"] = p.reserve_mb * MB
    state = sum(out.values())
    backward = {"backbone activations": activation_memory(p), **classifier_step_memory(p)}
    step = optimizer_step_memory(p)
    for key, value in {**backward, **step}.items():
        out[f"  (step) {key}"] = value
    out["peak of the step"] = max(sum(backward.values()), sum(step.values()))
    out["total"] = state + out["peak of the step"]
    return out


def communication(p: PlanInput) -> Dict[str, float]:
    """Bytes each GPU sends per optimizer step, per collective (ring algorithms)."""
    w, n, d = p.world_size, p.batch_size * p.world_size, p.embedding_size
    gather, reduce = (w - 1) / w, 2 * (w - 1) / w
    out = {"embedding all-gather (forward)": gather * n * d * 4,
           "embedding gradient all-reduce (backward)": reduce * n * d * 4,
           "label all-gather": gather * n * 8,
           "softmax all-reduces (row max; row sum + target)": reduce * 3 * n * 4,
           "LEAP batch std all-reduce": reduce * n * 4 if p.leap != "off" else 0.0,
           "LEAP refresh scalars (per step, amortised)":
               reduce * 7 * 8 / p.update_interval if p.leap != "off" else 0.0,
           "DDP gradient all-reduce": reduce * BACKBONE_PARAMS[p.backbone] * 4}
    out["total"] = sum(out.values())
    return out


def fits(p: PlanInput) -> bool:
    return memory(p)["total"] <= p.gpu_memory_gb * 1024 * MB


def largest_classes(p: PlanInput, upper: int = 10 ** 10) -> int:
    """The largest class count that fits on p's GPUs with everything else fixed (0 if none)."""
    if not fits(replace(p, classes=1)):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(replace(p, classes=mid)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def leap_extra(p: PlanInput) -> Tuple[float, float]:
    """(bytes of memory, bytes sent per step) per GPU that LEAP adds to the same run."""
    on, off = replace(p, leap="full"), replace(p, leap="off")
    return (memory(on)["total"] - memory(off)["total"],
            communication(on)["total"] - communication(off)["total"])


def report(p: PlanInput) -> str:
    """The human-readable plan launch/plan.py prints."""
    mem, com = memory(p), communication(p)
    lines = [f"plan: {p.classes:,} classes on {p.world_size} GPUs ({p.gpu_memory_gb:g} GiB), "
             f"{p.backbone}, batch {p.batch_size}/GPU, {p.precision}, {p.optimizer}, sample rate "
             f"{p.sample_rate:g}, LEAP {p.leap}",
             f"  class block: {local_classes(p.classes, p.world_size):,} classes per GPU, "
             f"{sampled_rows(p):,} used per step; global batch {p.batch_size * p.world_size:,}",
             "memory per GPU (MiB):"]
    for key, value in mem.items():
        lines.append(f"  {key:60s} {value / MB:12,.1f}")
    lines.append("communication per step, bytes each GPU sends (MiB):")
    for key, value in com.items():
        lines.append(f"  {key:60s} {value / MB:12,.3f}")
    ok = fits(p)
    lines.append(f"fits: {'yes' if ok else 'NO'} ({mem['total'] / MB:,.0f} of "
                 f"{p.gpu_memory_gb * 1024:,.0f} MiB); largest class count that fits: "
                 f"{largest_classes(p):,}")
    return "\n".join(lines)


def as_dict(p: PlanInput) -> Dict[str, object]:
    return {"input": asdict(p), "memory_bytes": memory(p), "communication_bytes": communication(p),
            "fits": fits(p), "largest_classes": largest_classes(p)}


def measure_activations(names: List[str], image_size: int = 112, batch: int = 2
                        ) -> Dict[str, Tuple[float, float]]:
    """MB per sample autograd saves in one fp32 training forward, without / with activation
    checkpointing (unique storages, so views are counted once). Weights are left uninitialised:
    only sizes matter."""
    import torch
    from facetrain.models.registry import build_backbone
    out = {}
    for name in names:
        sizes = []
        for ckpt in (False, True):
            kwargs = {"image_size": image_size}
            if ckpt:
                kwargs["activation_checkpointing"] = True
            try:
                with torch.device("meta"):
                    model = build_backbone(name, **kwargs)
            except Exception:            # a backbone without the option: same as plain
                sizes.append(sizes[0])
                continue
            model = model.to_empty(device="cpu").train()
            seen: Dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
                return t

            x = torch.zeros(batch, 3, image_size, image_size)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            sizes.append(sum(v for k, v in seen.items() if k not in params) / batch / MB)
        out[name] = (round(sizes[0], 1), round(sizes[1], 1))
    return out
