"""One typed, validated, immutable run configuration.

YAML files and dotted command-line overrides (`optim.lr=0.05`) map onto frozen dataclasses; an
unknown key anywhere is an error naming the key and the valid ones (InsightFace's EasyDict
silently adds a misspelled key). `Config.save` writes the resolved config beside a run's outputs.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A config value or key that breaks a rule; the message names the key and the fix."""


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(key: str, value: float, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        hb = ")" if hi_open else "]"
        raise ConfigError(f"{key} must be in {lb}{'-inf' if lo is None else lo}, "
                          f"{'inf' if hi is None else hi}{hb}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: an InsightFace/im2rec RecordIO prefix, a shard glob, or a folder."""

    rec: str = ""    # required to train: prefix of train.rec/.idx, or a folder holding shards
    loader: str = "torch"                      # torch | dali
    batch_size: int = 128                      # per rank
    num_workers: int = 2                       # torch loader workers / DALI CPU threads
    image_size: int = 112                      # the network's input height (images are resized to it)
    image_width: int = 0                       # input width; 0 = image_size (square). re-ID: 256 x 128
    random_flip: bool = True
    skip_bad_images: bool = False              # count and log undecodable images instead of failing
    rebuild_index: bool = False                # rebuild a missing/stale .idx from the .rec
    # Repeat-factor sampling (LVIS): class c with image fraction f_c is repeated
    # max(1, sqrt(t / f_c)) times per epoch; t = this threshold, 0 = off
    # (docs/long_tail_remedies.md). torch loader only.
    repeat_factor_threshold: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("data.loader", self.loader, ("torch", "dali"))
        _check_range("data.repeat_factor_threshold", self.repeat_factor_threshold, 0.0, 1.0)
        if self.repeat_factor_threshold > 0 and self.loader == "dali":
            # DALI's index cannot list a record twice (a record's size is the distance to the
            # next listed offset) and its mid-epoch resume removes served records by identity.
            raise ConfigError("data.repeat_factor_threshold > 0 (repeat-factor sampling) needs "
                              "data.loader=torch: DALI's reader cannot serve a record twice in "
                              "an epoch")
        _check_range("data.batch_size", self.batch_size, 1)
        _check_range("data.num_workers", self.num_workers, 0)
        _check_range("data.image_size", self.image_size, 8)
        if self.image_width != 0:
            _check_range("data.image_width", self.image_width, 8)

    @property
    def hw(self) -> Tuple[int, int]:
        """(height, width) the loaders resize to and the backbone is built for."""
        return self.image_size, self.image_width or self.image_size


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: a registered name (facetrain/models/registry.py) and its embedding."""

    backbone: str = "iresnet18"                # a name in facetrain.models.registry
    embedding_size: int = 512
    dropout: float = 0.0
    channels_last: bool = False
    compile: bool = False                      # torch.compile the backbone
    # ViT options (vit_*): share of patch tokens masked in training, and the last block's
    # drop-path rate; null = the backbone's arcface_torch default (docs/backbones.md).
    mask_ratio: Optional[float] = None
    drop_path: Optional[float] = None
    # Recompute each iresnet / ViT block in the backward pass instead of storing its activations:
    # the same gradients, far less activation memory, about a third more compute.
    activation_checkpointing: bool = False
    # Fine-tuning: start a NEW run from these backbone weights (an InsightFace .pth state_dict, a
    # facetrain export/backbone.pt or a checkpoint folder); the classifier starts fresh. A resume
    # from the run's own checkpoints wins over it. Keys/shapes must match the backbone exactly,
    # except the final embedding layer when init_allow_missing_final is true.
    init_from: str = ""
    init_allow_missing_final: bool = False
    # Written by the trainer into the resolved config: sha256 of the init_from file. If set by
    # the user, the file must have this hash.
    init_from_sha256: str = ""

    def __post_init__(self) -> None:
        _check_range("model.embedding_size", self.embedding_size, 1)
        _check_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.mask_ratio is not None:
            _check_range("model.mask_ratio", self.mask_ratio, 0.0, 1.0, hi_open=True)
        if self.drop_path is not None:
            _check_range("model.drop_path", self.drop_path, 0.0, 1.0, hi_open=True)
        if self.init_from_sha256 and not self.init_from:
            raise ConfigError("model.init_from_sha256 is set but model.init_from is empty")


# Margin kinds by name (facetrain/heads/kinds/, one file each; docs/heads.md). Which fields each
# reads: cosface m_cos; arcface m_arc; combined both; elasticface_arc m_arc + sigma;
# elasticface_cos m_cos + sigma; curricularface m_arc + stat_momentum; adaface m_arc (its m),
# h + stat_momentum; subcenter m_arc + subcenters; magface mag_* + lambda_g; ldam ldam_max_m.
MARGIN_KINDS = ("cosface", "arcface", "combined", "elasticface_arc", "elasticface_cos",
                "curricularface", "adaface", "subcenter", "magface", "ldam")
ELASTIC_KINDS = ("elasticface_arc", "elasticface_cos")


@dataclass(frozen=True)
class MarginConfig:
    """Target logit s*(cos(theta + m_arc) - m_cos); non-target s*cos(theta).

    cosface: m_arc=0, arcface: m_cos=0, combined: both (InsightFace's m2/m3). The other kinds
    and the fields they read are listed at MARGIN_KINDS and in docs/heads.md."""

    kind: str = "cosface"                      # one of MARGIN_KINDS
    scale: float = 64.0
    m_cos: float = 0.35
    m_arc: float = 0.5
    # ElasticFace (Boutros et al. 2022): each sample's margin ~ N(m, sigma) per step; 0 = fixed.
    sigma: float = 0.0
    # AdaFace (Kim et al. 2022): the concentration h of the norm-adaptive margin.
    h: float = 0.333
    # CurricularFace's t and AdaFace's norm mean/std: EMA weight of the new batch's value.
    stat_momentum: float = 0.01
    # Sub-center ArcFace (Deng et al. 2020): K weight vectors per class, the logit is the best.
    subcenters: int = 1
    # MagFace (Meng et al. 2021): the magnitude a = |f| clipped to [mag_a_min, mag_a_max] maps
    # linearly onto the margin [mag_m_min, mag_m_max]; lambda_g weights the regulariser g(a).
    mag_a_min: float = 10.0
    mag_a_max: float = 110.0
    mag_m_min: float = 0.45
    mag_m_max: float = 0.8
    lambda_g: float = 0.0
    # LDAM (Cao et al. 2019): class j's margin on the cosine is ldam_max_m * (K_min / K_j)^(1/4).
    ldam_max_m: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("head.margin.kind", self.kind, MARGIN_KINDS)
        _check_range("head.margin.scale", self.scale, 0.0, lo_open=True)
        _check_range("head.margin.m_cos", self.m_cos, 0.0, 1.0)
        _check_range("head.margin.m_arc", self.m_arc, 0.0, 3.1416)
        _check_range("head.margin.sigma", self.sigma, 0.0)
        _check_range("head.margin.h", self.h, 0.0, lo_open=True)
        _check_range("head.margin.stat_momentum", self.stat_momentum, 0.0, 1.0, lo_open=True)
        _check_range("head.margin.subcenters", self.subcenters, 1)
        if self.subcenters > 1 and self.kind != "subcenter":
            raise ConfigError(f"head.margin.subcenters={self.subcenters} gives each class several "
                              "weight vectors, which only head.margin.kind=subcenter uses; "
                              f"head.margin.kind is {self.kind!r}: set subcenters to 1 or "
                              "change kind")
        _check_range("head.margin.mag_a_min", self.mag_a_min, 0.0, lo_open=True)
        _check_range("head.margin.mag_m_min", self.mag_m_min, 0.0, 3.1416)
        _check_range("head.margin.mag_m_max", self.mag_m_max, 0.0, 3.1416)
        _check_range("head.margin.lambda_g", self.lambda_g, 0.0)
        _check_range("head.margin.ldam_max_m", self.ldam_max_m, 0.0, 1.0)
        if self.mag_a_max <= self.mag_a_min:
            raise ConfigError(f"head.margin.mag_a_max={self.mag_a_max} must be above "
                              f"head.margin.mag_a_min={self.mag_a_min}")
        if self.mag_m_max < self.mag_m_min:
            raise ConfigError(f"head.margin.mag_m_max={self.mag_m_max} must be at least "
                              f"head.margin.mag_m_min={self.mag_m_min}")
        if self.lambda_g > 0 and self.kind != "magface":
            raise ConfigError(f"head.margin.lambda_g={self.lambda_g} weights MagFace's magnitude "
                              f"regulariser, which only head.margin.kind=magface has; "
                              f"head.margin.kind is {self.kind!r}: set lambda_g to 0 or change kind")
        if self.sigma > 0 and self.kind not in ELASTIC_KINDS:
            raise ConfigError(f"head.margin.sigma={self.sigma} draws a per-sample margin, which "
                              f"only head.margin.kind={' or '.join(ELASTIC_KINDS)} does; "
                              f"head.margin.kind is {self.kind!r}: set sigma to 0 or change kind")


@dataclass(frozen=True)
class HeadConfig:
    """The model-parallel classifier: class sampling, margin kind, update rule, loss reweighting.

    Margin kinds, logit adjustment and inter-class filtering: docs/heads.md."""

    sample_rate: float = 1.0                   # partial-FC class sampling; 1.0 = full softmax
    margin: MarginConfig = field(default_factory=MarginConfig)
    # Which classifier rows an optimizer step touches when sampling: `all` (torch SGD over the
    # whole block, as InsightFace's PartialFC_V2) or `sampled` (a sparse gradient and momentum
    # SGD over the step's k rows only, as PartialFC v1; needs optim.name=sgd).
    update_rows: str = "all"
    # Class-balanced loss (Cui et al. 2019): each sample's CE is weighted by
    # (1 - beta) / (1 - beta^K) of its class, mean 1 over classes; 0 = off, typical 0.99-0.9999
    # (docs/long_tail_remedies.md).
    class_balance_beta: float = 0.0
    # Deferred re-weighting (Cao et al. 2019, LDAM-DRW): the class-balanced weights above apply
    # only from this epoch on; 0 = from the start.
    class_balance_start_epoch: int = 0
    # Logit adjustment (Menon et al. 2021): tau * log(K_j / sum K) is added to every scaled
    # logit j in training; tau = 1 is Balanced Softmax (Ren et al. 2020); 0 = off.
    logit_adjust_tau: float = 0.0
    # Partial FC's inter-class filtering (An et al. 2022): a non-target cosine above this is
    # set to 0 (a likely duplicate identity in noisy web data); 0 = off.
    interclass_filter: float = 0.0

    def __post_init__(self) -> None:
        _check_range("head.sample_rate", self.sample_rate, 0.0, 1.0, lo_open=True)
        _check_range("head.class_balance_beta", self.class_balance_beta, 0.0, 1.0, hi_open=True)
        _check_range("head.class_balance_start_epoch", self.class_balance_start_epoch, 0)
        _check_range("head.logit_adjust_tau", self.logit_adjust_tau, 0.0)
        _check_range("head.interclass_filter", self.interclass_filter, 0.0, 1.0, hi_open=True)
        if self.class_balance_start_epoch > 0 and self.class_balance_beta == 0:
            raise ConfigError(f"head.class_balance_start_epoch={self.class_balance_start_epoch} "
                              "defers the class-balanced weights, but head.class_balance_beta is "
                              "0 (no weights): set class_balance_beta (LDAM-DRW uses 0.9999)")
        _check_choice("head.update_rows", self.update_rows, ("all", "sampled"))


LEAP_CONTROLS = ("none", "null", "uniform", "shuffled", "uniform_meangap")


@dataclass(frozen=True)
class LeapConfig:
    """LEAP feature cloud; every field and the paper sentence behind it is in docs/leap.md."""

    mode: str = "full"                         # off | vanilla | full
    update_interval: int = 5                   # optimizer steps between centre updates
    center_lr: float = 0.1                     # 0.9 = the paper's Eq. 4 read literally
    memory_factor: float = 1.0                 # the paper's P: memory S_i = ceil(K_i * P)
    head_threshold: int = 20                   # T: frequent ("head") classes have K_i > T (vanilla)
    alpha_granularity: str = "logit"           # logit | sample
    start_epoch: int = 0                       # feature cloud from this epoch on
    # Experiment controls: none | null | uniform | shuffled | uniform_meangap (docs/leap.md).
    control: str = "none"
    width_scale: float = 1.0                   # lambda: every class's cloud variance * lambda

    def __post_init__(self) -> None:
        _check_choice("leap.mode", self.mode, ("off", "vanilla", "full"))
        _check_choice("leap.alpha_granularity", self.alpha_granularity, ("logit", "sample"))
        _check_choice("leap.control", self.control, LEAP_CONTROLS)
        _check_range("leap.update_interval", self.update_interval, 1)
        _check_range("leap.center_lr", self.center_lr, 0.0, 1.0, lo_open=True)
        _check_range("leap.memory_factor", self.memory_factor, 0.0, lo_open=True)
        _check_range("leap.head_threshold", self.head_threshold, 0)
        _check_range("leap.start_epoch", self.start_epoch, 0)
        _check_range("leap.width_scale", self.width_scale, 0.0, lo_open=True)
        if not math.isfinite(self.width_scale):
            raise ConfigError(f"leap.width_scale must be a finite number > 0; got {self.width_scale!r}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer of the backbone and the classifier block (sgd, adam, adamw), clipping, accumulation."""

    name: str = "sgd"                          # sgd | adamw | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 5.0                     # max global grad norm; 0 disables
    grad_accum: int = 1                        # micro-batches per optimizer step
    # The backbone's lr = lr * backbone_lr_scale (the classifier keeps lr); e.g. 0.1 when
    # fine-tuning from model.init_from. 1.0 = one lr for both.
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("sgd", "adamw", "adam"))
        _check_range("optim.backbone_lr_scale", self.backbone_lr_scale, 0.0, lo_open=True)
        _check_range("optim.lr", self.lr, 0.0, lo_open=True)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)
        _check_range("optim.grad_clip", self.grad_clip, 0.0)
        _check_range("optim.grad_accum", self.grad_accum, 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule per optimizer step (poly, cyclic triangular, step, constant)."""

    name: str = "poly"                         # poly | cyclic | step | constant
    warmup_epochs: float = 0.0
    power: float = 2.0                         # poly
    min_lr: float = 0.0                        # cyclic lower bound / poly floor
    cycle_epochs: float = 10.0                 # cyclic: length of one triangle (up + down)
    milestones: Tuple[float, ...] = ()         # step: epochs where lr *= gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_choice("schedule.name", self.name, ("poly", "cyclic", "step", "constant"))
        _check_range("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        _check_range("schedule.cycle_epochs", self.cycle_epochs, 0.0, lo_open=True)
        _check_range("schedule.gamma", self.gamma, 0.0, lo_open=True)


@dataclass(frozen=True)
class TrainConfig:
    """Run length, precision, engine (DDP or DeepSpeed ZeRO), device, seed and outputs."""

    epochs: int = 20
    max_steps: int = 0                         # stop after this many optimizer steps; 0 = no cap
    precision: str = "fp32"                    # fp32 | bf16 | fp16
    engine: str = "ddp"                        # ddp | deepspeed
    zero_stage: int = 1                        # deepspeed only: 1 or 2
    device: str = "auto"                       # auto | cpu | cuda
    seed: int = 0
    # The run folder (checkpoints, logs, exports); no default: the library knows no repository
    # path, and two runs must not share one folder by accident (a run resumes what it finds).
    output_dir: str = ""
    log_every: int = 20
    tensorboard: bool = True
    num_threads: int = 0                       # torch threads per rank; 0 = auto (threads.py)

    def __post_init__(self) -> None:
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.num_threads", self.num_threads, 0)
        _check_range("train.max_steps", self.max_steps, 0)
        _check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_choice("train.engine", self.engine, ("ddp", "deepspeed"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"train.zero_stage must be 1 or 2; got {self.zero_stage!r}")
        _check_range("train.log_every", self.log_every, 1)


@dataclass(frozen=True)
class CheckpointConfig:
    """How often to checkpoint, how many to keep, and what to resume from."""

    every_steps: int = 500                     # 0 = only at epoch ends
    keep_last: int = 3
    resume: str = "auto"                       # auto (latest in output_dir) | none | a path

    def __post_init__(self) -> None:
        _check_range("checkpoint.every_steps", self.every_steps, 0)
        _check_range("checkpoint.keep_last", self.keep_last, 1)


@dataclass(frozen=True)
class EvalConfig:
    """Verification packs (.bin) checked during training."""

    verification: Tuple[str, ...] = ()         # .bin packs checked during training
    every_steps: int = 0                       # 0 = only at the end
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_range("eval.every_steps", self.every_steps, 0)
        _check_range("eval.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    leap: LeapConfig = field(default_factory=LeapConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.head.margin.kind == "adaface" and self.data.batch_size < 2:
            # The norm statistics need a standard deviation; a 1-sample batch on one rank has none.
            raise ConfigError("head.margin.kind=adaface standardises the feature norms by the "
                              f"batch's std, which needs data.batch_size >= 2; got "
                              f"data.batch_size={self.data.batch_size}")
        if self.head.update_rows == "sampled" and self.optim.name != "sgd":
            raise ConfigError(f"head.update_rows=sampled updates classifier rows with momentum "
                              f"SGD; optim.name is {self.optim.name!r}: use optim.name=sgd or "
                              "head.update_rows=all")

    def to_dict(self) -> Dict[str, Any]:
        return _to_plain(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable with `load_config`)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(x) for x in obj]
    return obj


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(key, args[0], value)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or not args:    # Tuple[X, ...]: any length
            item_tp = args[0] if args else str
            return tuple(_coerce(key, item_tp, v) for v in value)
        if len(value) != len(args):                                # Tuple[X, Y]: exactly so many
            raise ConfigError(f"{key} must be a list of {len(args)} values; got {len(value)}: "
                              f"{list(value)!r}")
        return tuple(_coerce(key, t, v) for t, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer; got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
        if not math.isfinite(number):
            # float() takes "nan"/"inf"; no field means anything by them, and a NaN slips past
            # every range check (all comparisons with it are False).
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `off`/`on` as a boolean; `leap.mode: off` means the string.
            return "on" if value else "off"
        if value is None:
            # Likewise a bare `null` (leap.control=null) is YAML's None; a str field means the word.
            return "null"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    return value


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """`["optim.lr=0.05", "leap.mode=off"]` -> nested dict (values parsed as YAML scalars)."""
    tree: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data, "")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (or the defaults when path is None) and apply dotted overrides.

    A YAML file may say `base: other.yaml` (relative to itself) to start from another file.
    """
    tree: Dict[str, Any] = {}
    if path is not None:
        tree = _load_yaml_tree(Path(path))
    tree = _merge(tree, parse_overrides(overrides))
    return config_from_dict(tree)


def _load_yaml_tree(path: Path, depth: int = 0) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if depth > 8:
        raise ConfigError(f"config file {path}: 'base:' chain is deeper than 8 files")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is "
                          f"0x{raw[exc.start]:02x}); save it as UTF-8") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if tree is None:
        # An empty file would silently train with every default: almost always a wrong path
        # or a truncated copy. `{}` says "all defaults" on purpose.
        raise ConfigError(f"config file {path} is empty (or only comments); write its settings, "
                          "or `{}` for all defaults")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = tree.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config file {path}: 'base:' must be the path of another YAML "
                              f"file (relative to this one); got {base!r}")
        tree = _merge(_load_yaml_tree(path.parent / base, depth + 1), tree)
    return tree
