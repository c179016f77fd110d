"""Validation characters: held-out classes for choosing hyper-parameters without the test classes.

A glyph build (data/glyphs) uses its seeded candidate order for 2,000 training, 500 evaluation
and 500 distractor characters; the order holds thousands more characters that no set uses. This
module takes the next ones, with the build's own rule (covered by >= min_designs training designs
after blank renders are dropped), and writes them in the same three layouts as the test sets
(verification pack, IJB-C-style folder, MegaFace-style probes and distractors) under
`<glyphs>/validation/`. Nothing of the build itself is rewritten: its training set, evaluation
sets and manifest keep their bytes, so the main job's numbers do not move.

The validation folder records the SHA-256 of the build's manifest: a rebuilt or different glyph
set makes it stale, and `ensure_validation` builds it again rather than mixing two builds.
The large glyph set (make_longtail's default input) may hold these characters as training
classes: validate only models trained on splits of the build itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from glyph_benchmark import eval_sets
from glyph_benchmark.build import (MANIFEST, VERIFICATION_BIN, BuildSettings, GlyphBuildError,
                                    candidate_order, class_name, find_designs,
                                    render_qualifying, training_designs)

VALIDATION_DIR = "validation"
# Random streams of the validation sets' pairs and crops: [seed, 101] and [seed, 102], apart
# from the test sets' [seed, 1] and [seed, 2].
VERIFICATION_STREAM = 101
IJBC_STREAM = 102

Rendered = List[Tuple[str, List[Tuple[int, np.ndarray]]]]


def manifest_sha256(glyphs_root: Path) -> str:
    """SHA-256 of a finished glyph build's manifest (error naming the file when absent)."""
    path = Path(glyphs_root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the glyph set first "
                                "(python data_tools/build_glyphs.py)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_build(glyphs_root: Path) -> Tuple[BuildSettings, Dict[str, object]]:
    """The build's settings (as BuildSettings) and its manifest."""
    path = Path(glyphs_root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        raw = dict(manifest["settings"])
        for key in ("holdout_designs", "font_roots"):
            raw[key] = tuple(raw[key])
        settings = BuildSettings(**raw)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GlyphBuildError(f"{path} is not a glyph build manifest ({err}); rebuild "
                              f"{glyphs_root} with data_tools/build_glyphs.py") from None
    if settings.train_only:
        raise GlyphBuildError(f"{glyphs_root} is a training-only build (no test sets): "
                              "validation characters belong to a build with evaluation sets")
    return settings, manifest


def used_chars(settings: BuildSettings, manifest: Dict[str, object]) -> Set[str]:
    """Every character the build trains or evaluates on, plus the ones it was told to avoid."""
    used = set(settings.exclude_chars)
    for part in ("train", "eval", "distractors"):
        used |= set(manifest[part]["classes"])
    return used


def choose_validation_chars(designs, settings: BuildSettings, used: Set[str], count: int,
                            progress: bool = False) -> Rendered:
    """The first `count` characters of the build's candidate order outside `used` that pass the
    build's own test (>= min_designs non-blank training designs; with eval_heldout_only two
    held-out renders), rendered; their images are those the test sets would use."""
    use = training_designs(designs, settings.holdout_designs)
    order = [ch for ch in candidate_order(designs, use, settings.min_designs, settings.seed)
             if ch not in used]
    good: Rendered = render_qualifying(designs, order, use, count, settings, progress)
    if len(good) < count:
        raise GlyphBuildError(f"only {len(good)} characters outside the build's "
                              f"{len(used)} qualify (>= {settings.min_designs} designs); "
                              f"validation needs {count}: lower the validation class counts")
    good = good[:count]
    if settings.eval_heldout_only:
        use_set = set(use)
        good = [(ch, [(d, im) for d, im in imgs if d not in use_set]) for ch, imgs in good]
    return good


def build_validation(glyphs_root: Path, classes: Optional[int] = None,
                     distractors: Optional[int] = None, progress: bool = True,
                     say: Callable[[str], None] = print) -> Dict[str, object]:
    """Write `<glyphs_root>/validation/` (verification.bin, IJBC/, megaface/, manifest.json)
    for `classes` probe classes and `distractors` distractor classes (default: as many as the
    build's test sets, so validation metrics are as noisy as test ones); returns its manifest.
    Built in a scratch folder renamed at the end: a stopped build leaves no half set."""
    root = Path(glyphs_root)
    settings, manifest = read_build(root)
    classes = settings.eval_classes if classes is None else classes
    distractors = settings.distractor_classes if distractors is None else distractors
    if classes < 2 * eval_sets.VERIFICATION_FOLDS or distractors < 1:
        raise GlyphBuildError(f"validation needs >= {2 * eval_sets.VERIFICATION_FOLDS} classes "
                              f"and >= 1 distractor class; got {classes} and {distractors}")
    choice = find_designs(settings)
    kept = [(f.path, f.index) for f in choice.kept]
    built = [(d["file"], d["face"]) for d in manifest["designs"]]
    if kept != built:
        raise GlyphBuildError(f"the fonts on this machine differ from those {root} was built "
                              f"with ({len(kept)} designs now, {len(built)} then): rebuild "
                              f"{root} here before adding validation characters")
    used = used_chars(settings, manifest)
    say(f"rendering {classes} + {distractors} validation characters outside the {len(used)} "
        f"that {root} uses")
    chosen = choose_validation_chars(choice.kept, settings, used, classes + distractors,
                                     progress)
    named = [(class_name(ch), imgs) for ch, imgs in chosen]
    probes, dis = named[:classes], named[classes:]
    out = root / VALIDATION_DIR
    scratch = root / (VALIDATION_DIR + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        ver = eval_sets.write_verification_pack(
            scratch / VERIFICATION_BIN, probes, settings.verification_pairs,
            np.random.default_rng([settings.seed, VERIFICATION_STREAM]))
        ijbc = eval_sets.write_ijbc(scratch / "IJBC", probes, settings.ijbc_impostor_pairs,
                                    np.random.default_rng([settings.seed, IJBC_STREAM]))
        mega = eval_sets.write_megaface(scratch / "megaface", probes, dis)
        info = {"build_manifest_sha256": manifest_sha256(root),
                "classes": "".join(ch for ch, _ in chosen[:classes]),
                "distractors": "".join(ch for ch, _ in chosen[classes:]),
                "images": sum(len(i) for _, i in chosen[:classes]),
                "distractor_images": sum(len(i) for _, i in chosen[classes:]),
                "streams": [VERIFICATION_STREAM, IJBC_STREAM],
                "verification": ver, "ijbc": ijbc, "megaface": mega}
        # Written last inside the scratch folder: a validation folder with a manifest is whole.
        (scratch / MANIFEST).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    say(f"wrote {out}: {classes} probe classes ({info['images']} images), {distractors} "
        f"distractor classes")
    return info


def validation_is_current(glyphs_root: Path, classes: Optional[int] = None,
                          distractors: Optional[int] = None) -> bool:
    """True when `<glyphs_root>/validation` is whole, made from this very build, at these sizes
    (default: the build's test-set sizes)."""
    path = Path(glyphs_root) / VALIDATION_DIR / MANIFEST
    if not path.is_file():
        return False
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if info.get("build_manifest_sha256") != manifest_sha256(glyphs_root):
        return False
    settings, _ = read_build(Path(glyphs_root))
    classes = settings.eval_classes if classes is None else classes
    distractors = settings.distractor_classes if distractors is None else distractors
    return (len(info.get("classes", "")) == classes
            and len(info.get("distractors", "")) == distractors)


def ensure_validation(glyphs_root: Path, classes: Optional[int] = None,
                      distractors: Optional[int] = None, progress: bool = True,
                      say: Callable[[str], None] = print) -> Path:
    """The validation folder of `glyphs_root`, built (again) unless current; returns its path."""
    root = Path(glyphs_root)
    if not validation_is_current(root, classes, distractors):
        if (root / VALIDATION_DIR).exists():
            say(f"{root / VALIDATION_DIR} was made from another build or size: building it again")
        build_validation(root, classes, distractors, progress, say)
    check_disjoint(root)             # manifests only; an error names the two sets that overlap
    return root / VALIDATION_DIR


def check_disjoint(glyphs_root: Path) -> Dict[str, int]:
    """Counts of the build's sets and the validation sets; raises if any two share a character.
    Cheap (manifests only): run it before tuning."""
    root = Path(glyphs_root)
    settings, manifest = read_build(root)
    info = json.loads((root / VALIDATION_DIR / MANIFEST).read_text(encoding="utf-8"))
    sets: Dict[str, Sequence[str]] = {
        "train": manifest["train"]["classes"], "eval": manifest["eval"]["classes"],
        "distractors": manifest["distractors"]["classes"],
        "validation": info["classes"], "validation distractors": info["distractors"]}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(sets[a]) & set(sets[b])
            if shared:
                raise GlyphBuildError(f"{root}: {a} and {b} share {len(shared)} characters, e.g. "
                                      f"{sorted(shared)[:3]}")
    return {k: len(v) for k, v in sets.items()}


VALIDATION_EVAL = "eval_validation.json"   # per run, beside the test evaluation's eval.json


def evaluate_on_validation(runs: Mapping[str, Mapping[int, Path]], validation_root: Path,
                           rec: Path, tail_samples: int, out: Path, baseline: str,
                           threads: int = 2) -> Path:
    """Evaluate every run on the validation characters (cached per run in
    eval_validation.json) and write `<out>/validation.md` and `validation.json`: the same
    tables as the test report, paired by seed against `baseline`. Returns the markdown path."""
    from experiments import report
    from experiments.evaluation import evaluate_run
    evals = {m: {seed: evaluate_run(Path(r), Path(validation_root), Path(rec), tail_samples,
                                    threads=threads, cache_name=VALIDATION_EVAL,
                                    train_stats=False)
                 for seed, r in per.items()} for m, per in runs.items()}
    results = {m: {seed: report.metrics_from_eval(e["verification"], e["ijbc"], e["megaface"])
                   for seed, e in per.items()} for m, per in evals.items()}
    summary = report.summarize(results, baseline)
    md, _ = report.write_report(summary, out, "validation", "Validation characters (for tuning "
                                "only; the test classes are not used)",
                                extra={"validation_root": str(validation_root)})
    return md
