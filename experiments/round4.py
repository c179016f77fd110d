"""Round 4 of the glyph study as code: docs/study/round4_plan.md, step by step, resumable.

    python -m experiments.round4 status     # what is done, what is left, the time it needs
    python -m experiments.round4 tune       # grid runs, setting B seed 0, validation only
    python -m experiments.round4 pick       # the written rule -> runs/round4_B/tuning.json
    python -m experiments.round4 test       # every reported entry, B and H50, seeds 0-2, test
    python -m experiments.round4 archive    # every finished run's results into docs/study/round4_runs/
    python -m experiments.round4 report     # archive, then tables and the one plot into docs/study/

Every step calls the main job, which reuses finished runs and resumes a stopped training from
its last checkpoint, so any step can be stopped and started again. `tune` never evaluates on
the test characters; `pick` writes its choice once and refuses to change it afterwards (the
test numbers cannot feed back into it); `test` refuses to run before `pick`.

`test` trains and evaluates one (setting, seed) group per main-job call, so a stopped study
keeps every finished group's numbers. `archive` copies the results of finished runs (the
evaluation JSONs, `tuning.json`, and per run the CPU model, data build and code it came from)
into the repository, where the report reads them: a study that outlives one machine continues
on the next one from them (a run counts as done when its results are in runs/ or in the
archive). Paired numbers only compare within one data build on one kind of CPU, so `report`
says when a setting's runs come from more than one.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from experiments.study_report import TEST_EVAL, VALIDATION_EVAL, load_results

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO / "docs" / "study" / "round4_runs"     # results only (no models), committed
GLYPHS = REPO / "data" / "glyphs"                     # the main job's default build
BASELINE = "cosface"
TUNE_SETTING = "B"
TUNE_SEEDS = (0,)
TEST_SEEDS = (0, 1, 2)
RUN_ORIGIN = "run.json"            # archived per run: CPU model, data build, code
METRIC = "megaface_rank1"          # the one tuning metric, on the validation characters
TIE_POINTS = 0.2                   # validation rank-1 points within which values count as tied
SETTINGS: Dict[str, Tuple[str, ...]] = {       # name -> main-job flags
    "B": ("--out", "runs/round4_B"),
    "H50": ("--out", "runs/round4_H50", "--head", "50"),
}
# Reported untuned, in both settings (the paper defaults; see the plan for each).
DEFAULT_METHODS = ("cosface", "leap_full", "uniform_control", "shuffled_control",
                   "elasticface_arc", "elasticface_cos", "adaface", "curricularface",
                   "logit_adjust", "ldam_drw", "class_balanced", "repeat_factor")
# Candidates for "LEAP on top of the best margin head" (face-recognition margins; LDAM-DRW is
# a long-tail remedy with re-weighting and is not among them).
MARGIN_HEADS = ("elasticface_arc", "elasticface_cos", "adaface", "curricularface")


@dataclass(frozen=True)
class Grid:
    """A tuned hyper-parameter: the method specs of its values in order, the default's index,
    and whether the grid grows upward while the best value is at its top (LEAP's width)."""

    method: str
    specs: Tuple[str, ...]
    default: int
    open_ended: bool = False


def _width(method: str, w: str) -> str:
    return method if w == "1" else f"{method}-width{w}"


WIDTHS = ("1", "3", "10", "20", "40")
WIDTH_MAX = 640
GRIDS: Tuple[Grid, ...] = (
    Grid("class_balanced", ("class_balanced-beta0.5", "class_balanced-beta0.9", "class_balanced",
                            "class_balanced-beta0.999"), 2),
    # Each t with the schedule that keeps compute near the baseline's 12 epochs (plan).
    Grid("repeat_factor", ("repeat_factor-t0.0005-cycle4", "repeat_factor-t0.001-cycle3",
                           "repeat_factor"), 2),
    Grid("logit_adjust", ("logit_adjust-tau0.25", "logit_adjust-tau0.5", "logit_adjust",
                          "logit_adjust-tau2"), 2),
    Grid("elasticface_cos", ("elasticface_cos-sigma0.025", "elasticface_cos",
                             "elasticface_cos-sigma0.1", "elasticface_cos-sigma0.2"), 1),
    Grid("elasticface_arc", ("elasticface_arc-sigma0.025", "elasticface_arc",
                             "elasticface_arc-sigma0.1", "elasticface_arc-sigma0.2"), 1),
    Grid("leap_full", tuple(_width("leap_full", w) for w in WIDTHS), 0, open_ended=True),
    Grid("uniform_control", tuple(_width("uniform_control", w) for w in WIDTHS), 0,
         open_ended=True),
)


def validation_scores(folder: Path, seeds: Sequence[int] = TUNE_SEEDS,
                      archived: Optional[Path] = None) -> Dict[str, float]:
    """method spec -> mean validation rank-1 (points) over `seeds`, for specs with every seed
    (runs in `folder`, else the same runs in the `archived` copy)."""
    res = load_results(folder, VALIDATION_EVAL)
    if archived is not None and archived.is_dir():
        for m, per in load_results(archived, VALIDATION_EVAL).items():
            res.setdefault(m, {}).update({k: v for k, v in per.items() if k not in res.get(m, {})})
    return {m: 100.0 * sum(per[s][METRIC] for s in seeds) / len(seeds)
            for m, per in res.items() if all(s in per and METRIC in per[s] for s in seeds)}


def choose(specs: Sequence[str], default: int, scores: Mapping[str, float]) -> str:
    """The plan's rule: the highest validation rank-1; values within TIE_POINTS of the best
    are tied, and among them the one nearest the default in grid position wins (the smaller
    change); equal distance goes to the smaller position. Every value must have a score."""
    missing = [s for s in specs if s not in scores]
    if missing:
        raise ValueError(f"no validation score yet for {missing}: run `tune` to the end")
    best = max(scores[s] for s in specs)
    tied = [i for i, s in enumerate(specs) if scores[s] >= best - TIE_POINTS]
    return specs[min(tied, key=lambda i: (abs(i - default), i))]


def extend_open_grid(grid: Grid, scores: Mapping[str, float]) -> Tuple[str, ...]:
    """LEAP's and uniform's widths: while the best of the values tried is one of the two
    largest, add the next doubling (up to WIDTH_MAX). The sweep stops once two larger widths
    have both scored below the best, i.e. the peak is inside the grid."""
    specs = list(grid.specs)
    while all(s in scores for s in specs):
        best = max(range(len(specs)), key=lambda i: scores[specs[i]])
        if best < len(specs) - 2:
            break
        top = float(specs[-1].rsplit("-width", 1)[1]) if "-width" in specs[-1] else 1.0
        if top * 2 > WIDTH_MAX:
            break
        specs.append(_width(grid.method, f"{int(top * 2)}"))
    return tuple(specs)


def tuning_specs(scores: Mapping[str, float]) -> List[str]:
    """Every grid value to train for tuning now (open grids extended by what scored so far),
    plus the margin heads for the LEAP-on-top choice and the baseline."""
    out = [BASELINE]
    for g in GRIDS:
        specs = extend_open_grid(g, scores) if g.open_ended else g.specs
        out += [s for s in specs if s not in out]
    out += [m for m in MARGIN_HEADS if m not in out]
    return out


def make_choice(scores: Mapping[str, float]) -> Dict[str, object]:
    """The tuned spec of every grid, and the best margin head (each ElasticFace at its tuned
    sigma) with LEAP full on top, from validation scores of the finished tuning runs."""
    tuned = {}
    for g in GRIDS:
        specs = extend_open_grid(g, scores) if g.open_ended else g.specs
        tuned[g.method] = choose(specs, g.default, scores)
    heads = [tuned.get(h, h) for h in MARGIN_HEADS]
    missing = [h for h in heads if h not in scores]
    if missing:
        raise ValueError(f"no validation score yet for {missing}: run `tune` to the end")
    head = max(heads, key=lambda h: (scores[h], -heads.index(h)))
    return {"rule": f"max validation {METRIC} over seeds {list(TUNE_SEEDS)} of setting "
                    f"{TUNE_SETTING}; ties within {TIE_POINTS} points go to the value nearest "
                    "the default in grid position",
            "tuned": tuned, "best_margin_head": head,
            "leap_on_top": leap_on_top(head),
            "scores": {k: round(v, 4) for k, v in sorted(scores.items())}}


def leap_on_top(head_spec: str) -> str:
    """`leap_full+<head>` with the head's knobs kept: 'elasticface_cos-sigma0.1' ->
    'leap_full+elasticface_cos-sigma0.1'."""
    return f"leap_full+{head_spec}"


def test_specs(choice: Mapping[str, object]) -> List[str]:
    """The reported entries: every untuned default, every tuned value that differs, and the
    best margin head with LEAP on top."""
    out = list(DEFAULT_METHODS)
    out += [s for s in choice["tuned"].values() if s not in out]
    head = choice["best_margin_head"]
    if head not in out:
        out.append(head)
    out.append(leap_on_top(head))
    return out


def _main_job(setting: str, methods: Sequence[str], seeds: Sequence[int], eval_on: str,
              dry: bool) -> None:
    cmd = [sys.executable, "-m", "experiments.main_job", *SETTINGS[setting],
           "--methods", ",".join(methods), "--seeds", ",".join(str(s) for s in seeds),
           "--eval-on", eval_on]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def _folder(setting: str) -> Path:
    return REPO / SETTINGS[setting][1]


def _archived(setting: str) -> Path:
    return ARCHIVE / setting


def _tune_scores() -> Dict[str, float]:
    return validation_scores(_folder(TUNE_SETTING), archived=_archived(TUNE_SETTING))


def _choice_path() -> Path:
    """runs/round4_B/tuning.json; restored there from the archive when only the archive has it
    (a study continued on another machine keeps its frozen choice)."""
    path = _folder(TUNE_SETTING) / "tuning.json"
    saved = _archived(TUNE_SETTING) / "tuning.json"
    if not path.is_file() and saved.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved, path)
    return path


def is_done(setting: str, spec: str, seed: int) -> bool:
    """The test evaluation of this run exists, in runs/ or in the archive."""
    run = f"{spec}_seed{seed}"
    return any((root / run / TEST_EVAL).is_file()
               for root in (_folder(setting), _archived(setting)))


def run_tune(dry: bool = False) -> None:
    """Train and validate until every grid, open ones included, is complete."""
    while True:
        scores = _tune_scores()
        specs = tuning_specs(scores)
        if all(s in scores for s in specs) or dry:
            if dry:
                _main_job(TUNE_SETTING, specs, TUNE_SEEDS, "validation", True)
            return
        _main_job(TUNE_SETTING, [s for s in specs if s not in scores or s == BASELINE],
                  TUNE_SEEDS, "validation", False)


def run_pick() -> Dict[str, object]:
    """Write tuning.json once; a later call returns the written choice unchanged."""
    path = _choice_path()
    if path.is_file():
        print(f"{path} exists: the choice is frozen")
        return json.loads(path.read_text())
    choice = make_choice(_tune_scores())
    path.write_text(json.dumps(choice, indent=1) + "\n")
    print(json.dumps({k: choice[k] for k in ("tuned", "best_margin_head")}, indent=1))
    return choice


def _run_cpu(setting: str, spec: str, seed: int) -> str:
    """The CPU model a finished run came from: this machine's for runs/, run.json's for a run
    found only in the archive."""
    run = f"{spec}_seed{seed}"
    origin = _archived(setting) / run / RUN_ORIGIN
    if (_folder(setting) / run / TEST_EVAL).is_file() or not origin.is_file():
        return _cpu_model()
    return json.loads(origin.read_text())["cpu"]


def test_groups(specs: Sequence[str]) -> List[Tuple[str, int, List[str]]]:
    """(setting, seed, entries to run) per group with a missing run, in the order the study
    runs them (B first, then H50; seed by seed). The baseline is always in a group's list: the
    main job pairs every entry with it (a finished baseline is reused, not trained again). A
    group finished on one machine counts; one left half-done on a machine with another CPU
    model is run again whole here, so that each seed's pairs come from one kind of CPU."""
    groups = []
    here = _cpu_model()
    for setting in SETTINGS:
        for seed in TEST_SEEDS:
            todo = [m for m in specs if not is_done(setting, m, seed)]
            if todo and any(_run_cpu(setting, m, seed) != here for m in specs if m not in todo):
                todo = list(specs)
            if todo:
                groups.append((setting, seed, [BASELINE] + [m for m in todo if m != BASELINE]))
    return groups


def run_test(dry: bool = False) -> None:
    path = _choice_path()
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `tune` and `pick` first (no test evaluation "
                         "before the choice is written)")
    specs = test_specs(json.loads(path.read_text()))
    for setting, seed, todo in test_groups(specs):
        _main_job(setting, todo, (seed,), "test", dry)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _code_version() -> str:
    """The commit the runs' code came from: FROZEN_FROM of a `git archive` copy, else git."""
    frozen = REPO / "FROZEN_FROM"
    if frozen.is_file():
        return frozen.read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def archive(glyphs: Optional[Path] = None) -> int:
    """Copy every finished run's result files (and tuning.json) into ARCHIVE/<setting>/, each
    run with where it came from (run.json: CPU model, data build, code). A run already in the
    archive keeps its provenance. Returns the number of runs copied now."""
    from experiments.validation import manifest_sha256
    origin: Dict[str, str] = {}                   # this machine's, computed when first needed
    copied = 0
    for setting in SETTINGS:
        src, dst = _folder(setting), _archived(setting)
        for run in sorted(p for p in src.glob("*_seed*") if p.is_dir()):
            files = [run / f for f in (TEST_EVAL, VALIDATION_EVAL) if (run / f).is_file()]
            if not files:
                continue
            out = dst / run.name
            out.mkdir(parents=True, exist_ok=True)
            new = False
            for f in files:
                if not (out / f.name).is_file() or (out / f.name).read_bytes() != f.read_bytes():
                    shutil.copyfile(f, out / f.name)
                    new = True
            if not (out / RUN_ORIGIN).is_file():
                origin = origin or {"cpu": _cpu_model(), "code": _code_version(),
                                    "data_manifest_sha256": manifest_sha256(glyphs or GLYPHS)}
                (out / RUN_ORIGIN).write_text(json.dumps(origin, indent=1) + "\n")
            copied += new
        if (src / "tuning.json").is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "tuning.json", dst / "tuning.json")
    print(f"archived {copied} new or changed run(s) into {ARCHIVE}")
    return copied


def origins(setting_dir: Path) -> Dict[Tuple[str, str], List[str]]:
    """(CPU model, data build) -> the archived runs of one setting that came from it."""
    out: Dict[Tuple[str, str], List[str]] = {}
    for p in sorted(Path(setting_dir).glob(f"*_seed*/{RUN_ORIGIN}")):
        o = json.loads(p.read_text())
        out.setdefault((o["cpu"], o["data_manifest_sha256"][:12]), []).append(p.parent.name)
    return out


def status(minutes_per_run: float) -> str:
    """Runs done and left per step, and the time left at `minutes_per_run`."""
    lines = []
    scores = _tune_scores()
    tune = tuning_specs(scores)
    left_tune = [s for s in tune if s not in scores]
    lines.append(f"tune: {len(tune) - len(left_tune)}/{len(tune)} validated (open grids grow "
                 f"while their best is at the top); left: {', '.join(left_tune) or 'none'}")
    left = len(left_tune)
    if _choice_path().is_file():
        specs = test_specs(json.loads(_choice_path().read_text()))
        for setting in SETTINGS:
            done = [(m, s) for m in specs for s in TEST_SEEDS if is_done(setting, m, s)]
            todo = len(specs) * len(TEST_SEEDS) - len(done)
            left += todo
            lines.append(f"test {setting}: {len(done)}/{len(specs) * len(TEST_SEEDS)} evaluated")
    else:
        lines.append("pick: not yet; test: after pick (at least "
                     f"{len(DEFAULT_METHODS) * len(TEST_SEEDS) * len(SETTINGS)} runs)")
    lines.append(f"about {left} runs left that are known now, "
                 f"~{left * minutes_per_run / 60:.1f} h at {minutes_per_run} min each")
    return "\n".join(lines)


def report() -> None:
    """Archive, then the tables and the plot from the archive (what the repository holds)."""
    from experiments import study_report
    archive()
    for setting in SETTINGS:
        found = origins(_archived(setting))
        if len(found) > 1:
            print(f"warning: setting {setting} has runs from {len(found)} machines or data "
                  f"builds ({'; '.join(f'{c} / {d}: {len(r)} runs' for (c, d), r in found.items())}"
                  "): paired numbers only compare within one", file=sys.stderr)
    folders = [str(_archived(s)) for s in SETTINGS if _archived(s).is_dir()]
    md = REPO / "docs/study/round4_tables.md"
    study_report.main([*folders, "--md", str(md),
                       "--plot", str(REPO / "docs/study/img/round4_gains.png")])
    results = {s: load_results(_archived(s)) for s in SETTINGS}
    extra = [baseline_markdown(results)]
    saved = _archived(TUNE_SETTING) / "tuning.json"
    if saved.is_file():
        choice = json.loads(saved.read_text())
        extra += [contrast_markdown(results, contrasts(choice)), tuning_markdown(choice)]
    md.write_text(md.read_text(encoding="utf-8") + "\n" + "\n".join(extra), encoding="utf-8")


def baseline_markdown(results: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]]
                      ) -> str:
    """The baseline's own values per setting (mean [min..max] over its seeds, in percent), the
    level every gain above is measured from."""
    from experiments.study_report import METRICS
    names = [s for s in results if BASELINE in results[s]]
    lines = [f"## {BASELINE}'s own numbers", "",
             "Mean [min..max] over its test seeds, in percent.", "",
             "| metric | " + " | ".join(f"{n} (seeds)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for met in METRICS:
        cells = []
        for n in names:
            v = [per[met.key] * met.scale for per in results[n][BASELINE].values()
                 if met.key in per]
            cells.append(f"{sum(v) / len(v):.2f} [{min(v):.2f}..{max(v):.2f}] ({len(v)})"
                         if v else "n/a")
        lines.append(f"| {met.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def contrasts(choice: Mapping[str, object]) -> List[Tuple[str, str]]:
    """The paired comparisons the plan asks for besides "against the baseline": does LEAP add
    to the best margin head, and LEAP against its matched controls (untuned and each at its own
    tuned width)."""
    tuned: Mapping[str, str] = choice["tuned"]               # type: ignore[assignment]
    return [(str(choice["leap_on_top"]), str(choice["best_margin_head"])),
            ("leap_full", "uniform_control"), ("leap_full", "shuffled_control"),
            (tuned["leap_full"], tuned["uniform_control"])]


def contrast_markdown(results: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]],
                      pairs: Sequence[Tuple[str, str]]) -> str:
    """Per setting, `a − b` on every metric at the seeds both ran: mean [min..max] (k/n)."""
    from experiments.study_report import METRICS, gain_cell, paired_gains
    lines = ["## Paired contrasts", "",
             "a − b in points at the seeds both ran: mean [min..max] (seeds positive / seeds).",
             "", "| setting | a − b | " + " | ".join(m.label for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for setting, res in results.items():
        for a, b in pairs:
            if a not in res or b not in res:
                continue
            gains = paired_gains({a: res[a], b: res[b]}, b)[a]     # b as the baseline
            cells = [gain_cell(gains[m.key]) for m in METRICS]
            lines.append(f"| {setting} | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tuning_markdown(choice: Mapping[str, object]) -> str:
    """Every grid's validation rank-1 (setting B, seed 0) with the chosen value in bold, the
    untuned default marked, and the margin head chosen for LEAP on top."""
    scores: Mapping[str, float] = choice["scores"]           # type: ignore[assignment]
    lines = ["## Tuning on the validation characters", "",
             f"Validation MegaFace-style rank-1 (%), setting {TUNE_SETTING}, seed 0. Chosen value "
             f"in bold; (d) marks the untuned default. Rule: {choice['rule']}.", "",
             "| method | values | chosen |", "|---|---|---|"]
    for g in GRIDS:
        specs = extend_open_grid(g, scores) if g.open_ended else g.specs
        chosen = choice["tuned"][g.method]                    # type: ignore[index]
        cells = []
        for i, spec in enumerate(specs):
            knob = spec[len(g.method):].lstrip("-") or "default"
            cell = f"{knob}{' (d)' if i == g.default else ''}: {scores.get(spec, float('nan')):.2f}"
            cells.append(f"**{cell}**" if spec == chosen else cell)
        lines.append(f"| {g.method} | " + ", ".join(cells) + f" | {chosen} |")
    heads = ", ".join(f"{h}: {scores[h]:.2f}" for h in
                      [choice["tuned"].get(h, h) for h in MARGIN_HEADS]  # type: ignore[union-attr]
                      if h in scores)
    lines += ["", f"Margin heads (each ElasticFace at its tuned sigma): {heads}. Best: "
              f"{choice['best_margin_head']}, so the LEAP-on-top entry is "
              f"{choice['leap_on_top']}. {BASELINE}: {scores.get(BASELINE, float('nan')):.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("status", "tune", "pick", "test", "archive", "report"))
    p.add_argument("--dry-run", action="store_true", help="print the main-job commands only")
    p.add_argument("--minutes-per-run", type=float, default=1.8,
                   help="for `status`: training plus one evaluation (measured 1.5-1.7 on the "
                        "2-core AMD EPYC machine with nothing else running, 7.5 at load 9)")
    args = p.parse_args(argv)
    if args.step == "status":
        print(status(args.minutes_per_run))
    elif args.step == "tune":
        run_tune(args.dry_run)
    elif args.step == "pick":
        run_pick()
    elif args.step == "test":
        run_test(args.dry_run)
    elif args.step == "archive":
        archive()
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
