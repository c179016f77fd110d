"""Flags, model/feature resolution, table printing, JSON writing and error printing shared by
the eval CLIs. No metric math here: that lives in facetrain.eval. The library's messages name
its parameters (`features`, `algo`); `run` prints them as this program's flags."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

# Defaults of a run without flags: the newest exported backbone anywhere under runs/
# (runs/<run>/export/backbone.pt from launch/train_face.py, and the main job's
# runs/main/<method>_seed<k>/export/backbone.pt; by modification time) on the embedded glyph
# benchmark under data/glyphs/eval/. Paths are relative to the current working directory (the
# repository root in the README's commands).
RUNS_GLOB = "runs/**/export/backbone.pt"
EVAL_ROOT = Path("data/glyphs/eval")
VERIFICATION_PACKS = (EVAL_ROOT / "verification.bin",)
IJBC_ROOT = EVAL_ROOT / "IJBC"
MEGAFACE_ROOT = EVAL_ROOT / "megaface"
REID_ROOT = EVAL_ROOT / "reid"
REPORTS_DIR = Path("runs/eval")


class UsageError(Exception):
    """Something the user must supply or fix; printed without a traceback."""


def add_common_args(parser: argparse.ArgumentParser, default_json: str,
                    image_size: Sequence[int] = (112,)) -> None:
    """Flags every protocol shares; image_size (side,) for faces or (H, W) for re-ID crops."""
    g = parser.add_argument_group("model / features")
    g.add_argument("--model", default=None,
                   help="exported backbone: facetrain-backbone .pt, TorchScript, or backbone.onnx "
                        f"(run with onnxruntime); default: the newest {RUNS_GLOB}")
    g.add_argument("--features", default=None,
                   help="precomputed float32 features .npy, one row per image in the protocol's "
                        "order; skips the model")
    g.add_argument("--save-features", default=None,
                   help="write the extracted features to this .npy for later --features runs")
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    if len(image_size) == 1:
        g.add_argument("--image-size", type=int, default=None,
                       help="network input side in pixels (default: the exported model's "
                            f"image_size, else {image_size[0]})")
        parser.set_defaults(default_image_size=image_size[0])
    else:
        g.add_argument("--image-size", type=int, nargs=2, default=list(image_size),
                       metavar=("H", "W"), help="network input height and width in pixels")
    g.add_argument("--no-flip", action="store_true",
                   help="do not add the horizontally flipped image's embedding")
    g.add_argument("--device", default=None, help="torch device; default cuda if available")
    o = parser.add_argument_group("output")
    o.add_argument("--json", default=default_json, help="write the report as JSON here")
    o.add_argument("--plot", default=None,
                   help="write the PNG plot here; default: next to --json with .png")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
               ) -> argparse.Namespace:
    """parse_args, then check every output path up front (a --json that names a directory must
    fail before a long extraction, not with a traceback at the end)."""
    from facetrain.eval.checks import check_output_path
    args = parser.parse_args(argv)
    try:
        check_output_path(args.json, "--json", ".json")
        png = plot_path(args)
        if png is not None:
            check_output_path(png, "--plot", ".png")
        if args.save_features:
            check_output_path(args.save_features, "--save-features", ".npy")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return args


def plot_path(args: argparse.Namespace) -> Optional[Path]:
    if args.no_plot:
        return None
    return Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")


def exported_backbones(pattern: str = RUNS_GLOB) -> List[Path]:
    """Files matching `pattern` (`**` spans any depth), oldest first (mtime, then path)."""
    found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return [Path(p) for p in sorted(found, key=lambda p: (os.path.getmtime(p), p))]


def require(path: Path, what: str, flag: str) -> Path:
    """Fail with the missing path and the flag that points elsewhere."""
    if not Path(path).exists():
        raise UsageError(f"{what} not found at {path}; pass {flag} (see --help)")
    return Path(path)


def features_or_extract(args: argparse.Namespace, n_expected: int, what: str,
                        dataset_factory: Callable[[], object]) -> np.ndarray:
    """--features if given (checked against n_expected rows), else run the model."""
    from facetrain.eval.checks import check_features
    from facetrain.eval.embed import extract_features, load_features
    if args.features:
        return load_features(args.features, n_expected, what)
    model, device = load_model(args)
    feats = extract_features(model, dataset_factory(), args.batch_size, flip=not args.no_flip,
                             device=device, image_size=args.image_size,
                             progress=not args.quiet, desc=what)
    check_features(feats, f"features of {what} from the model", n_expected, what,
                   fix="the model gives NaN/inf or empty embeddings: check the model file "
                       "(a diverged training exports NaN weights)")
    if args.save_features:
        Path(args.save_features).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_features, feats)
    return feats


def load_model(args: argparse.Namespace):
    """--model (default: the newest export) on --device; also settles args.image_size."""
    from facetrain.eval.embed import load_backbone_with_info
    model_path = args.model
    if model_path is not None and not Path(model_path).is_file():
        raise UsageError(f"model file {model_path} does not exist: pass --model PATH to an "
                         "exported backbone.pt, backbone.onnx or TorchScript file")
    if model_path is None:
        found = exported_backbones()
        if not found:
            raise UsageError(f"no model: nothing matches {RUNS_GLOB} (train one with "
                             "launch/train_face.py or scripts/main_job.sh); pass --model PATH "
                             "or --features PATH.npy")
        model_path = found[-1]
        print(f"no --model given: using the newest of {len(found)} exported backbone(s) under "
              f"runs/: {model_path} (pass --model PATH to choose another)", file=sys.stderr)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_backbone_with_info(model_path, device)
    if args.image_size is None:                    # faces: follow the model, else 112
        size = info.get("image_size") or args.default_image_size
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else tuple(size)
        args.image_size = size
    print(f"model: {model_path} (input {args.image_size})", file=sys.stderr)
    return model, device


def print_table(headers: Sequence[str], rows: List[Sequence[object]], title: str = "") -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def add_fpr_rule_arg(parser: argparse.ArgumentParser) -> None:
    """--fpr-rule for protocols that report TPR at FPR targets."""
    from facetrain.eval.metrics import FPR_RULES
    parser.add_argument("--fpr-rule", choices=FPR_RULES, default=FPR_RULES[0],
                        help="le: the largest TPR whose FPR is <= the target (conservative); "
                             "nearest: InsightFace's ROC point nearest the target (reproduces "
                             "published tables; may lie above the target)")


def _fmt(v: object) -> str:
    if v is None:                     # a TPR the impostor count cannot resolve (see metrics)
        from facetrain.eval.metrics import UNRESOLVED
        return UNRESOLVED
    if isinstance(v, float):
        return f"{100 * v:.2f}" if 0.0 <= v <= 1.0 else f"{v:.4g}"
    return str(v)


def write_json(path: str | Path, report: Dict[str, object]) -> Path:
    """JSON with numpy values converted and bulky arrays (ROC curves, features) left out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_plain(report), fh, indent=2)
    print(f"report: {path}")
    return path


def _plain(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()
                if k not in ("roc", "template_ids", "template_features")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def for_command_line(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with each backquoted library parameter that is one of `parser`'s destinations
    written as that option (`features` -> --features, `algo` 'x/y' -> --algo 'x/y')."""
    from facetrain.advice import render_params
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    return render_params(message, flags)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]],
        build_parser: Callable[[], argparse.ArgumentParser]) -> int:
    """Call a CLI's body, turning user errors into one 'error:' line, in the flags of
    `build_parser()`'s parser, and exit status 2; the library's log records go to stderr in the
    tools' format."""
    from facetrain.logging_utils import setup_tool_logging

    setup_tool_logging()
    try:
        return main(argv)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"error: {for_command_line(str(err), build_parser())}", file=sys.stderr)
        return 2
