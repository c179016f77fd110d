"""Method names of the main job beyond the fixed list: a margin head with LEAP on top, and a
hyper-parameter moved off its default, as `--methods` entries and run-folder names.

    <method>[+<method>][-<knob><value>]...

- `leap_full+elasticface_cos`: both methods' overrides, the LEAP one (`leap_*`, `*_control`)
  last, so its `leap.mode` wins over the head's `leap.mode=off`. At most one of each kind.
- `-<knob><value>` sets one tuned hyper-parameter, e.g. `class_balanced-beta0.999`,
  `repeat_factor-t0.001`, `logit_adjust-tau1.5`, `elasticface_cos-sigma0.1`,
  `leap_full-width20`, `uniform_control-width20`, `repeat_factor-t0.001-cycle3` (3 cycles of
  3 epochs: `-cycle` sets the schedule of a repeat-factor variant). A knob must belong to the
  method.

Plain names resolve to exactly their METHODS overrides, so existing runs and folder names keep
their meaning.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence, Tuple

# knob -> (config key, the base methods it applies to)
KNOBS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "beta": ("head.class_balance_beta", ("class_balanced", "ldam_drw")),
    "t": ("data.repeat_factor_threshold", ("repeat_factor",)),
    "tau": ("head.logit_adjust_tau", ("logit_adjust",)),
    "sigma": ("head.margin.sigma", ("elasticface_cos", "elasticface_arc")),
    "width": ("leap.width_scale", ("leap_full", "leap_vanilla", "uniform_control",
                                   "shuffled_control")),
    # Epochs per LR cycle, 3 cycles: train.epochs = 3 * cycle. Repeat-factor sampling
    # lengthens the epoch by a factor set by t; this keeps a t variant near equal compute.
    "cycle": ("schedule.cycle_epochs", ("repeat_factor",)),
}
_KNOB = re.compile(r"^(beta|tau|sigma|width|cycle|t)(\d+(?:\.\d+)?(?:e-?\d+)?)$")


def _is_leap(name: str) -> bool:
    return name.startswith("leap_") or name.endswith("_control")


def parse(spec: str, methods: Mapping[str, Sequence[str]]) -> Tuple[Tuple[str, ...],
                                                                     Dict[str, str]]:
    """`spec` -> (base methods, {knob: value text}); a clear error names what is wrong."""
    if spec in methods:
        return (spec,), {}
    head, *knob_parts = spec.split("-")
    bases = tuple(b for b in head.split("+"))
    unknown = [b for b in bases if b not in methods]
    if not bases or unknown or any(not b for b in bases):
        raise ValueError(f"method {spec!r}: unknown method(s) {unknown or [head]}; known: "
                         f"{', '.join(methods)} (combine with '+', tune with -beta, -t, -tau, "
                         "-sigma, -width)")
    if len(bases) > 2 or (len(bases) == 2 and _is_leap(bases[0]) == _is_leap(bases[1])):
        raise ValueError(f"method {spec!r}: '+' joins one head or remedy with one LEAP method "
                         "or control, e.g. leap_full+elasticface_cos")
    knobs: Dict[str, str] = {}
    for part in knob_parts:
        m = _KNOB.match(part)
        if not m:
            raise ValueError(f"method {spec!r}: {part!r} is not a knob and value; knobs: "
                             f"{', '.join(KNOBS)} (e.g. -beta0.999)")
        knob, value = m.groups()
        if knob in knobs:
            raise ValueError(f"method {spec!r}: knob {knob!r} given twice")
        if not set(bases) & set(KNOBS[knob][1]):
            raise ValueError(f"method {spec!r}: -{knob} ({KNOBS[knob][0]}) applies to "
                             f"{', '.join(KNOBS[knob][1])} only")
        knobs[knob] = value
    return bases, knobs


def overrides(spec: str, methods: Mapping[str, Sequence[str]]) -> Tuple[str, ...]:
    """The config overrides of a method spec (see the module doc)."""
    bases, knobs = parse(spec, methods)
    ordered = sorted(bases, key=_is_leap)              # head or remedy first, LEAP last
    out = tuple(o for b in ordered for o in methods[b])
    extra = []
    for k, v in knobs.items():
        if k == "cycle":
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"method {spec!r}: -cycle takes a whole number of epochs >= 1")
            extra.append(f"train.epochs={3 * int(v)}")
        extra.append(f"{KNOBS[k][0]}={v}")
    return out + tuple(extra)
