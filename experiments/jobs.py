"""The main job: baseline vs LEAP on the embedded long-tailed glyph benchmark, end to end.

data (build_glyphs -> make_longtail) -> one `torchrun` training per (method, seed), the
classifier sharded over the processes -> every evaluator on each exported backbone ->
one Table-4-shaped report with paired differences over seeds, plus PNGs (head-vs-tail angular
variance, ROC curves). Each finished run is reused when the job is started again, so an
interrupted job continues where it stopped.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# method name -> config overrides (leap.md: `off` is the CosFace/ArcFace baseline).
METHODS: Dict[str, Tuple[str, ...]] = {
    "cosface": ("leap.mode=off",),
    "leap_full": ("leap.mode=full",),
    "leap_vanilla": ("leap.mode=vanilla",),
    # Controls (docs/leap.md): the baseline with LEAP's random stream consumed the same way;
    # untargeted angular noise of LEAP's expected per-sample variance (one shared level, or
    # LEAP's levels shuffled over the classes); the earlier, unmatched uniform control.
    # Quoted: overrides are parsed as YAML, where a bare `null` is None.
    "null_control": ("leap.mode=full", "leap.control='null'"),
    "uniform_control": ("leap.mode=full", "leap.control=uniform"),
    "shuffled_control": ("leap.mode=full", "leap.control=shuffled"),
    "uniform_meangap_control": ("leap.mode=full", "leap.control=uniform_meangap"),
    # Long-tail remedies a user would try instead of LEAP (docs/long_tail_remedies.md), on the
    # CosFace baseline. beta = 0.99: a 3-image tail class weighs (1 - .99^25) / (1 - .99^3)
    # ~ 7.48x a head class (all 100 head classes of the built split have 25 images).
    # t = 0.002: a 3-image class of the default split (f = 3/8,200) gets r ~ 2.3, every head
    # class (f = 25/8,200 > t) r = 1, so an epoch is ~1.9x longer;
    # 6 epochs of 3 cycles keep the number of steps near the baseline's 12 (equal compute, as
    # LVIS trains repeat-factor sampling on the baseline's iteration budget).
    "class_balanced": ("leap.mode=off", "head.class_balance_beta=0.99"),
    "repeat_factor": ("leap.mode=off", "data.repeat_factor_threshold=0.002", "train.epochs=6",
                      "schedule.cycle_epochs=2"),
    # Margin heads and logit-level long-tail baselines (docs/heads.md), LEAP off, on the demo's
    # scale. ElasticFace-Cos keeps the baseline's mean margin and adds untargeted per-sample
    # noise to it: the published method closest to the study's "untargeted noise" controls.
    "elasticface_cos": ("leap.mode=off", "head.margin.kind=elasticface_cos",
                        "head.margin.sigma=0.05"),
    "elasticface_arc": ("leap.mode=off", "head.margin.kind=elasticface_arc", "head.margin.m_arc=0.5",
                        "head.margin.sigma=0.05"),
    "curricularface": ("leap.mode=off", "head.margin.kind=curricularface", "head.margin.m_arc=0.5"),
    "adaface": ("leap.mode=off", "head.margin.kind=adaface", "head.margin.m_arc=0.4"),
    "subcenter": ("leap.mode=off", "head.margin.kind=subcenter", "head.margin.m_arc=0.5",
                  "head.margin.subcenters=3"),
    "magface": ("leap.mode=off", "head.margin.kind=magface", "head.margin.lambda_g=35"),
    # LDAM-DRW: deferred weights from the third cycle, where LEAP's cloud starts.
    "ldam_drw": ("leap.mode=off", "head.margin.kind=ldam", "head.class_balance_beta=0.9999",
                 "head.class_balance_start_epoch=8"),
    "logit_adjust": ("leap.mode=off", "head.logit_adjust_tau=1.0"),
}
BASELINE = "cosface"


@dataclass(frozen=True)
class JobSettings:
    """Everything the main job varies; defaults are the README's main command."""

    out: Path = Path("runs/main")
    config: Path = REPO / "configs" / "default.yaml"
    methods: Tuple[str, ...] = ("cosface", "leap_full", "uniform_control", "shuffled_control")
    seeds: Tuple[int, ...] = (0,)
    nproc: int = 2
    glyphs: Path = Path("data/glyphs")
    build_args: Tuple[str, ...] = ()          # extra data_tools/build_glyphs.py flags
    head: int = 100
    tail: Optional[int] = None
    tail_samples: int = 3
    # Glyph design name substrings the TAIL classes never keep (head classes keep every design):
    # a style gap only head classes can show, LEAP's premise (make_longtail --tail-exclude).
    tail_without_designs: Tuple[str, ...] = ()
    overrides: Tuple[str, ...] = ()
    eval_batch: int = 256
    threads: int = 2
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from experiments import method_specs
        for m in self.methods:       # plain names, `a+b` and `-knob<value>` (method_specs.py)
            method_specs.parse(m, METHODS)
        if BASELINE not in self.methods:
            raise ValueError(f"methods must include the baseline {BASELINE!r} (paired differences "
                             "are taken against it)")
        if not self.seeds:
            raise ValueError("give at least one seed")

    @property
    def longtail(self) -> Path:
        tail = "all" if self.tail is None else str(self.tail)
        # Beside the glyph folder: data/glyphs -> data/longtail_H100_Tall_S3 (make_longtail's
        # own default name), so the default job and a plain make_longtail call share the split.
        # Another glyph folder gets its own prefix (data/glyphs_holdout ->
        # data/glyphs_holdout_longtail_H100_Tall_S3): a split is never reused across datasets.
        name = f"longtail_H{self.head}_T{tail}_S{self.tail_samples}"
        if self.glyphs.name != "glyphs":
            name = f"{self.glyphs.name}_{name}"
        if self.tail_without_designs:
            name += "_tailwithout_" + "-".join(re.sub(r"[^A-Za-z0-9]+", "", d)
                                               for d in self.tail_without_designs)
        return self.glyphs.parent / name


def _say(msg: str) -> None:
    print(f"[main-job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: List[str], env: Optional[Mapping[str, str]] = None) -> None:
    """Run a step in the repository root, streaming its progress; a failure names the step."""
    _say("$ " + " ".join(cmd))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env)
    if proc.returncode != 0:
        raise RuntimeError(f"step failed with exit code {proc.returncode}: {' '.join(cmd)}")


def ensure_data(s: JobSettings) -> Path:
    """Build the glyph benchmark and its long-tailed split if they are not there yet."""
    from glyph_benchmark.build import MANIFEST
    from glyph_benchmark.large import is_built
    # The manifest is written last: a build stopped halfway has none and is built again.
    if not is_built(REPO / s.glyphs):
        if (REPO / s.glyphs).is_dir() and any((REPO / s.glyphs).iterdir()):
            _say(f"{s.glyphs} holds no finished build (no {MANIFEST}): building it again")
        _run([sys.executable, "data_tools/build_glyphs.py", "--out", str(s.glyphs),
              *s.build_args])
    if not (REPO / s.longtail / "train.rec").is_file():
        cmd = [sys.executable, "data_tools/make_longtail.py", "--input", str(s.glyphs / "train"),
               "--output", str(s.longtail), "--head", str(s.head),
               "--tail-samples", str(s.tail_samples)]
        if s.tail is not None:
            cmd += ["--tail", str(s.tail)]
        if s.tail_without_designs:
            exclude = s.longtail.parent / f"{s.longtail.name}.tail_exclude.csv"
            write_design_exclusion(REPO / s.glyphs / "train_designs.csv", REPO / exclude,
                                   s.tail_without_designs)
            cmd += ["--tail-exclude", str(exclude)]
        _run(cmd)
    return s.longtail


def write_design_exclusion(designs_csv: Path, out: Path, names: Sequence[str]) -> int:
    """Rows of a glyph set's train_designs.csv whose design name contains one of `names`
    (case-insensitive) -> `out`, a make_longtail --tail-exclude file; returns the row count."""
    if not designs_csv.is_file():
        raise FileNotFoundError(f"{designs_csv} is missing: rebuild the glyph set with the "
                                "current data_tools/build_glyphs.py, which writes it")
    with open(designs_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    wanted = [n.lower() for n in names]
    kept = [r for r in rows if any(n in r["name"].lower() for n in wanted)]
    unmatched = [n for n in wanted if not any(n in r["name"].lower() for r in kept)]
    if unmatched:
        known = sorted({r["name"] for r in rows})
        raise ValueError(f"{designs_csv}: no design name contains {unmatched}; designs: "
                         f"{', '.join(known)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["label", "ordinal", "design", "name"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    _say(f"{out}: {len(kept)} training images of designs matching {list(names)} kept out of "
         "the tail")
    return len(kept)


def method_overrides(method: str) -> Tuple[str, ...]:
    """Config overrides of a `--methods` entry: METHODS[name], or a combination or tuned
    variant (experiments/method_specs.py)."""
    from experiments import method_specs
    return method_specs.overrides(method, METHODS)


def run_dir(s: JobSettings, method: str, seed: int) -> Path:
    return s.out / f"{method}_seed{seed}"


def train(s: JobSettings, method: str, seed: int, rec: Path) -> Path:
    """One training under torchrun (gloo on CPU); reused when its export already exists."""
    out = run_dir(s, method, seed)
    if (REPO / out / "export" / "backbone.pt").is_file():
        _say(f"{out}: already trained, reusing it")
        return out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={s.nproc}", "launch/train_face.py", "--config", str(s.config),
           f"data.rec={rec}", f"train.seed={seed}", f"train.output_dir={out}",
           *method_overrides(method), *s.overrides]
    env = {"OMP_NUM_THREADS": str(max(1, s.threads // s.nproc)), **s.extra_env}
    _run(cmd, env)
    return out
