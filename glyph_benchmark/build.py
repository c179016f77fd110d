"""Build the embedded glyph benchmark: characters are identities, font designs their photos.

Steps: find one face per installed CJK design (fonts.py); pick characters covered by at least
`min_designs` designs in a seeded order; render each in each design, dropping blank renders;
split into disjoint training, held-out evaluation and distractor classes; write the training set
as an InsightFace-layout RecordIO and the held-out classes as an LFW-style pack, an IJB-C-style
folder and a MegaFace-style probe/distractor set (eval_sets.py). Same seed -> same bytes.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from glyph_benchmark import eval_sets
from glyph_benchmark.fonts import (FONT_PACKAGES, FONT_ROOTS, PROBE_CHARS, DesignChoice,
                                    FontFace, discover_faces, missing_packages, select_designs)
from glyph_benchmark.render import render_many

log = logging.getLogger(__name__)

TRAIN_PREFIX = "train"             # <out>/train.rec, train.idx, property
EVAL_DIR = "eval"                  # <out>/eval/{verification.bin, IJBC/, megaface/}
VERIFICATION_BIN = "verification.bin"
MANIFEST = "manifest.json"
TRAIN_DESIGNS = "train_designs.csv"  # <out>/train_designs.csv: label,ordinal,design,name per image
# Characters to render beyond what the splits need, since blank renders can drop a candidate
# below min_designs; more are rendered in further rounds if still short.
RENDER_SLACK = 1.1


class GlyphBuildError(ValueError):
    """A build setting or machine state that cannot produce the dataset; says what to change."""


@dataclass(frozen=True)
class BuildSettings:
    """Every knob of a build; written into the manifest."""

    out: str                         # output folder (no default: the caller owns the layout)
    seed: int = 0
    train_classes: int = 2000
    eval_classes: int = 500
    distractor_classes: int = 500
    min_designs: int = 20            # a class needs this many (non-blank) designs
    size: int = 32                   # output image side (the property file says it)
    jobs: int = 2                    # rendering processes
    verification_pairs: int = 3000
    ijbc_impostor_pairs: int = 100000
    holdout_designs: Tuple[str, ...] = ()   # name/file substrings: designs kept out of training
    eval_heldout_only: bool = False          # eval/distractor images only in held-out designs
    font_roots: Tuple[str, ...] = field(default=FONT_ROOTS)
    train_only: bool = False                 # write the training set only (no eval sets)
    exclude_chars: str = ""                  # never used, e.g. another build's held-out classes

    def validate(self) -> None:
        for name in ("train_classes", "min_designs", "size", "jobs"):
            if getattr(self, name) < 1:
                raise GlyphBuildError(f"`{name}` must be >= 1; "
                                      f"got {getattr(self, name)}")
        if self.min_designs < 2:
            raise GlyphBuildError(f"`min_designs` must be >= 2 (a class needs two images for a "
                                  f"same-class pair); got {self.min_designs}")
        if self.size < 8:
            raise GlyphBuildError(f"`size` must be >= 8 pixels; got {self.size}")
        if self.train_only:
            if self.eval_classes or self.distractor_classes or self.eval_heldout_only:
                raise GlyphBuildError("`train_only` writes no evaluation sets: `eval_classes` "
                                      "and `distractor_classes` must be 0 and "
                                      "`eval_heldout_only` unset")
            return
        self._validate_eval()

    def _validate_eval(self) -> None:
        if self.eval_classes < 1:
            raise GlyphBuildError(f"`eval_classes` must be >= 1; got {self.eval_classes}")
        if self.distractor_classes < 1:
            raise GlyphBuildError("`distractor_classes` must be >= 1 (MegaFace needs "
                                  f"distractors); got {self.distractor_classes}")
        folds = 2 * eval_sets.VERIFICATION_FOLDS
        if self.verification_pairs < folds or self.verification_pairs % folds:
            raise GlyphBuildError(f"`verification_pairs` must be a positive multiple of {folds} "
                                  "(10 folds, each half same-class and half different-class "
                                  f"pairs); got {self.verification_pairs}")
        if self.eval_classes < folds:
            raise GlyphBuildError(f"`eval_classes` must be >= {folds} (each of the 10 "
                                  "verification folds draws different-class pairs from its own "
                                  f"classes); got {self.eval_classes}")
        if self.eval_heldout_only and not self.holdout_designs:
            raise GlyphBuildError("`eval_heldout_only` needs `holdout_designs` (which designs "
                                  "to keep out of training and evaluate on)")
        if self.ijbc_impostor_pairs < 1:
            raise GlyphBuildError("`ijbc_impostor_pairs` must be >= 1; "
                                  f"got {self.ijbc_impostor_pairs}")


@dataclass
class Classes:
    """Rendered classes: char -> [(design index, image uint8 [S, S])], in design order."""

    train: List[Tuple[str, List[Tuple[int, np.ndarray]]]]
    eval: List[Tuple[str, List[Tuple[int, np.ndarray]]]]
    distractors: List[Tuple[str, List[Tuple[int, np.ndarray]]]]


def class_name(ch: str) -> str:
    """Folder-safe class name of a character: 'u4e00'."""
    return f"u{ord(ch):04x}"


def find_designs(settings: BuildSettings) -> DesignChoice:
    """Designs on this machine; too few for `min_designs` is an error naming missing packages."""
    choice = select_designs(discover_faces(settings.font_roots))
    for face, why in choice.dropped:
        log.info("font dropped: %s (%s): %s", face.key, face.name, why)
    for face in choice.kept:
        log.info("font kept: %s (%s), %d ideographs", face.key, face.name, len(face.coverage))
    for h in settings.holdout_designs:
        if len(training_designs(choice.kept, (h,))) == len(choice.kept):
            raise GlyphBuildError(f"`holdout_designs` {h!r} matches no kept design; use part of "
                                  "a name or file from: " + ", ".join(
                                      f"{f.name} ({f.key})" for f in choice.kept))
    n_train = len(training_designs(choice.kept, settings.holdout_designs))
    if n_train < settings.min_designs:
        missing = missing_packages(FONT_PACKAGES)
        fix = (f"install the missing font packages: sudo apt-get install {' '.join(missing)}"
               ) if missing else \
            "all listed font packages are installed: lower `min_designs`"
        raise GlyphBuildError(f"found {len(choice.kept)} distinct CJK font designs under "
                              f"{', '.join(settings.font_roots)} ({n_train} usable for training) "
                              f"but `min_designs` is {settings.min_designs}; {fix}")
    return choice


def training_designs(designs: Sequence[FontFace], holdout: Sequence[str]) -> List[int]:
    """Indices of designs used for training: all but those whose name or file matches `holdout`."""
    def held(face: FontFace) -> bool:
        return any(h.lower() in face.name.lower() or h.lower() in face.key.lower()
                   for h in holdout)
    return [i for i, f in enumerate(designs) if not held(f)]


def candidate_order(designs: Sequence[FontFace], use: Sequence[int], min_designs: int,
                    seed: int) -> List[str]:
    """Characters covered by >= min_designs of the designs `use`, in a seeded random order."""
    counts: Dict[int, int] = {}
    for i in use:
        for cp in designs[i].coverage:
            counts[cp] = counts.get(cp, 0) + 1
    eligible = np.array(sorted(cp for cp, n in counts.items() if n >= min_designs), np.int64)
    order = np.random.default_rng([seed, 0]).permutation(eligible)
    return [chr(int(cp)) for cp in order]


def render_chars(designs: Sequence[FontFace], chars: Sequence[str], size: int, jobs: int,
                 progress: bool) -> Dict[str, List[Tuple[int, np.ndarray]]]:
    """Render `chars` in every design covering them; blank renders are left out. One task per
    design (a worker opens each font once); results are assembled in design order."""
    tasks = []
    for i, face in enumerate(designs):
        mine = [c for c in chars if ord(c) in face.coverage]
        probe = [c for c in PROBE_CHARS if ord(c) in face.coverage]
        tasks.append((face.path, face.index, size, mine, probe))
    results: List[Optional[Tuple]] = [None] * len(tasks)
    bar = _progress(len(tasks), "render designs", progress)
    if jobs > 1:
        # spawn: the parent may hold threads (torch, tqdm); forking those is unsafe.
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
            for i, res in pool.imap_unordered(_render_task, list(enumerate(tasks))):
                results[i] = res
                bar(1)
    else:
        for i, task in enumerate(tasks):
            results[i] = render_many(*task)
            bar(1)
    bar(0, close=True)
    out: Dict[str, List[Tuple[int, np.ndarray]]] = {c: [] for c in chars}
    for i, (task, res) in enumerate(zip(tasks, results)):
        for ch, img in zip(task[3], res):
            if img is not None:
                out[ch].append((i, img))
    return out


def _render_task(item: Tuple[int, Tuple]) -> Tuple[int, Tuple]:
    i, task = item
    return i, render_many(*task)


def _progress(total: int, desc: str, enabled: bool) -> Callable[..., None]:
    """A tqdm-backed `update(n, close=False)`; a no-op when progress is off."""
    if not enabled:
        return lambda n, close=False: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="it", leave=False)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()
    return update


def render_qualifying(designs: Sequence[FontFace], order: Sequence[str], use: Sequence[int],
                      need: int, settings: BuildSettings, progress: bool = True
                      ) -> List[Tuple[str, List[Tuple[int, np.ndarray]]]]:
    """Render `order` in chunks until `need` characters pass the build's test (>= min_designs
    non-blank training designs; with eval_heldout_only also two held-out renders, for a
    same-class pair), in order; fewer when `order` runs out. The test sets and the validation
    set both choose through here, so they apply the same rule."""
    use_set = set(use)
    good: List[Tuple[str, List[Tuple[int, np.ndarray]]]] = []
    start = 0
    while len(good) < need and start < len(order):
        chunk = order[start:start + int((need - len(good)) * RENDER_SLACK) + 64]
        start += len(chunk)
        rendered = render_chars(designs, chunk, settings.size, settings.jobs, progress)
        for ch in chunk:
            n_use = sum(1 for d, _ in rendered[ch] if d in use_set)
            if n_use >= settings.min_designs and (not settings.eval_heldout_only
                                                  or len(rendered[ch]) - n_use >= 2):
                good.append((ch, rendered[ch]))
    return good


def choose_classes(designs: Sequence[FontFace], settings: BuildSettings,
                   progress: bool = True) -> Classes:
    """Render candidates in seeded order until enough have >= min_designs non-blank training
    designs, then split them: train, then held-out eval, then distractors (disjoint)."""
    use = training_designs(designs, settings.holdout_designs)
    order = candidate_order(designs, use, settings.min_designs, settings.seed)
    if settings.exclude_chars:
        excluded = set(settings.exclude_chars)
        order = [ch for ch in order if ch not in excluded]
    need = settings.train_classes + settings.eval_classes + settings.distractor_classes
    if len(order) < need:
        raise GlyphBuildError(f"only {len(order)} characters are covered by >= "
                              f"{settings.min_designs} designs but the splits need {need}: lower "
                              "`min_designs` or the class counts")
    good = render_qualifying(designs, order, use, need, settings, progress)
    if len(good) < need:
        raise GlyphBuildError(f"only {len(good)} characters render in >= {settings.min_designs} "
                              f"designs (blank glyphs dropped); the splits need {need}")
    good = good[:need]
    n_tr, n_ev = settings.train_classes, settings.eval_classes
    use_set = set(use)
    train = [(ch, [(d, im) for d, im in imgs if d in use_set]) for ch, imgs in good[:n_tr]]
    rest = good[n_tr:]
    if settings.eval_heldout_only:
        rest = [(ch, [(d, im) for d, im in imgs if d not in use_set]) for ch, imgs in rest]
    return Classes(train, rest[:n_ev], rest[n_ev:])


def write_train(prefix: Path, train: Sequence[Tuple[str, List[Tuple[int, np.ndarray]]]],
                size: int, progress: bool) -> int:
    """InsightFace-layout RecordIO via the data layer's writer; label = index in `train`."""
    from facetrain.build.writer import write_insightface_dataset

    def items():
        for label, (_ch, images) in enumerate(train):
            for _d, img in images:
                yield label, eval_sets.encode_jpeg(img)
    n = sum(len(imgs) for _, imgs in train)
    it = items()
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=n, desc="write train.rec", unit="img", leave=False)
    write_insightface_dataset(str(prefix), it, len(train), size)
    return n


def write_train_designs(path: Path, train: Sequence[Tuple[str, List[Tuple[int, np.ndarray]]]],
                        designs: Sequence[FontFace]) -> None:
    """label,ordinal,design,name for every training image: which design each image is, so a
    split can control which styles its tail keeps (make_longtail `tail_exclude`)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("label,ordinal,design,name\n")
        for label, (_ch, images) in enumerate(train):
            for ordinal, (d, _img) in enumerate(images):
                fh.write(f"{label},{ordinal},{d},{designs[d].name.replace(',', ' ')}\n")


def build(settings: BuildSettings, progress: bool = True) -> Dict[str, object]:
    """Build every output under settings.out; returns (and writes) the manifest."""
    settings.validate()
    clock = time.perf_counter()
    choice = find_designs(settings)
    designs = choice.kept
    log.info("step 1/4: %d designs kept, %d font faces dropped (%.1fs)", len(designs),
             len(choice.dropped), time.perf_counter() - clock)
    classes = choose_classes(designs, settings, progress)
    log.info("step 2/4: rendered %d + %d + %d classes (%.1fs)", len(classes.train),
             len(classes.eval), len(classes.distractors), time.perf_counter() - clock)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last and marks a finished build: an earlier one goes first, so a
    # rebuild stopped halfway (half new files, half old) is never taken for a finished one.
    (out / MANIFEST).unlink(missing_ok=True)
    n_train = write_train(out / TRAIN_PREFIX, classes.train, settings.size, progress)
    write_train_designs(out / TRAIN_DESIGNS, classes.train, designs)
    log.info("step 3/4: wrote %s.rec, %d images (%.1fs)", out / TRAIN_PREFIX, n_train,
             time.perf_counter() - clock)
    if settings.train_only:
        log.info("step 4/4: --train-only: no evaluation sets")
        manifest = _manifest(settings, choice, classes, n_train, None, None, None)
    else:
        manifest = _manifest(settings, choice, classes, n_train,
                             *_write_eval_sets(out, classes, settings))
        log.info("step 4/4: wrote %s (verification, IJBC, megaface) (%.1fs)", out / EVAL_DIR,
                 time.perf_counter() - clock)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return manifest


def _write_eval_sets(out: Path, classes: Classes, settings: BuildSettings
                     ) -> Tuple[Dict, Dict, Dict]:
    """Verification pack, IJB-C and MegaFace folders under out/eval; -> their manifest parts."""
    # Eval sets go to a scratch folder renamed at the end, so a failed build leaves no half set.
    scratch = out / (EVAL_DIR + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    named_eval = [(class_name(ch), imgs) for ch, imgs in classes.eval]
    named_dis = [(class_name(ch), imgs) for ch, imgs in classes.distractors]
    ver = eval_sets.write_verification_pack(scratch / VERIFICATION_BIN, named_eval,
                                            settings.verification_pairs,
                                            np.random.default_rng([settings.seed, 1]))
    ijbc = eval_sets.write_ijbc(scratch / "IJBC", named_eval, settings.ijbc_impostor_pairs,
                                np.random.default_rng([settings.seed, 2]))
    mega = eval_sets.write_megaface(scratch / "megaface", named_eval, named_dis)
    shutil.rmtree(out / EVAL_DIR, ignore_errors=True)
    scratch.rename(out / EVAL_DIR)
    return ver, ijbc, mega


def _manifest(settings: BuildSettings, choice: DesignChoice, classes: Classes, n_train: int,
              ver: Optional[Dict], ijbc: Optional[Dict], mega: Optional[Dict]
              ) -> Dict[str, object]:
    """What was built from what: settings, designs kept/dropped (why), classes, counts.
    A `train_only` build has null verification/ijbc/megaface parts."""
    train_idx = set(training_designs(choice.kept, settings.holdout_designs))
    return {
        "settings": asdict(settings),
        "designs": [{"index": i, "file": f.path, "face": f.index, "name": f.name,
                     "ideographs": len(f.coverage), "in_training": i in train_idx}
                    for i, f in enumerate(choice.kept)],
        "dropped_fonts": [{"file": f.path, "face": f.index, "name": f.name, "why": why}
                          for f, why in choice.dropped],
        "train": {"classes": "".join(ch for ch, _ in classes.train), "images": n_train,
                  "designs_file": TRAIN_DESIGNS},
        "eval": {"classes": "".join(ch for ch, _ in classes.eval),
                 "images": sum(len(i) for _, i in classes.eval)},
        "distractors": {"classes": "".join(ch for ch, _ in classes.distractors),
                        "images": sum(len(i) for _, i in classes.distractors)},
        "verification": ver, "ijbc": ijbc, "megaface": mega,
    }
