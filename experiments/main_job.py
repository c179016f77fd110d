"""The main job: build the embedded long-tailed glyph benchmark, train the CosFace baseline and
LEAP with torchrun (classifier sharded over the processes), evaluate every run on every
protocol, and write one report with plots. Finished runs are reused when started again.

    python -m experiments.main_job                 # CosFace, LEAP full, matched uniform and shuffled controls, seed 0
    python -m experiments.main_job --methods cosface,leap_full,leap_vanilla,uniform_control,shuffled_control \
        --seeds 0,1,2 --out runs/study                          # the study in the README
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not __package__:     # run as a file: the harness package is not importable that way
    sys.exit("run it from the repository root as: python -m experiments.main_job ...")


def parse_args(argv=None) -> argparse.Namespace:
    from experiments.jobs import METHODS
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/main", help="run folder of the whole job")
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"),
                   help="training config every run starts from")
    p.add_argument("--methods", default="cosface,leap_full,uniform_control,shuffled_control",
                   help=f"comma-separated, from: {', '.join(METHODS)} (cosface is required); "
                        "also `a+b` (a head with LEAP on top, e.g. leap_full+elasticface_cos) "
                        "and tuned variants `name-<knob><value>` (knobs beta, t, tau, sigma, "
                        "width, e.g. class_balanced-beta0.999): experiments/method_specs.py")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--glyphs", default="data/glyphs",
                   help="glyph benchmark folder (built there when missing); the long-tailed "
                        "split is written beside it")
    p.add_argument("--build-args", default="",
                   help="extra flags for data_tools/build_glyphs.py, one string "
                        "(e.g. \"--train-classes 500\")")
    p.add_argument("--nproc", type=int, default=2, help="processes per training (torchrun)")
    p.add_argument("--head", type=int, default=100, help="make_longtail --head (head classes)")
    p.add_argument("--tail", type=int, default=None, help="make_longtail --tail (default: all)")
    p.add_argument("--tail-samples", type=int, default=3, help="make_longtail --tail-samples")
    p.add_argument("--tail-without-designs", default="",
                   help="design name substrings (space-separated, e.g. \"Kouzan Soseki kiloji "
                        "Seto\") that tail classes never keep; head classes keep every design")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training and eval")
    p.add_argument("--eval-on", choices=("test", "validation", "both"), default="test",
                   help="test: the held-out evaluation characters (default, the report); "
                        "validation: only the validation characters (<glyphs>/validation, built "
                        "on first use, disjoint from every set), for tuning, written to "
                        "<out>/validation.md; both: each")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides for every run, e.g. train.epochs=6")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from experiments.jobs import BASELINE, JobSettings, ensure_data, train
    from experiments.evaluation import evaluate_run, write_job_report

    args = parse_args(argv)
    s = JobSettings(out=Path(args.out), config=Path(args.config),
                    methods=tuple(m for m in args.methods.split(",") if m),
                    seeds=tuple(int(x) for x in args.seeds.split(",") if x), nproc=args.nproc,
                    glyphs=Path(args.glyphs), build_args=tuple(args.build_args.split()),
                    head=args.head, tail=args.tail, tail_samples=args.tail_samples,
                    tail_without_designs=tuple(args.tail_without_designs.split()),
                    overrides=tuple(args.overrides), threads=args.threads)
    t0 = time.time()
    rec = ensure_data(s)
    runs = {m: {seed: train(s, m, seed, rec) for seed in s.seeds} for m in s.methods}
    if args.eval_on != "test":
        from experiments.validation import ensure_validation, evaluate_on_validation
        val = ensure_validation(REPO / s.glyphs)
        md = evaluate_on_validation({m: {k: REPO / v for k, v in per.items()}
                                     for m, per in runs.items()}, val, REPO / rec,
                                    s.tail_samples, REPO / s.out, BASELINE, threads=s.threads)
        print(Path(md).read_text())
        if args.eval_on == "validation":
            print(f"[main-job] done in {time.time() - t0:.0f} s: {md} (no test evaluation)")
            return 0
    evals = {m: {seed: evaluate_run(REPO / r, REPO / s.glyphs / "eval", REPO / rec,
                                    s.tail_samples, threads=s.threads)
                 for seed, r in per.items()} for m, per in runs.items()}
    settings = {"methods": s.methods, "seeds": s.seeds, "config": str(s.config),
                "overrides": s.overrides, "split": str(rec), "nproc": s.nproc}
    paths = write_job_report(REPO / s.out, {m: {k: REPO / v for k, v in per.items()}
                                            for m, per in runs.items()}, evals, BASELINE, settings)
    print(Path(paths["markdown"]).read_text())
    print(f"[main-job] done in {time.time() - t0:.0f} s: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
