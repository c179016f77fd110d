"""Method specs of the main job (experiments/method_specs.py): combinations and tuned variants
resolve to the exact config overrides, plain names to their METHODS entry, mistakes to errors."""
from __future__ import annotations

import pytest

from experiments.jobs import METHODS, JobSettings, method_overrides


def test_plain_names_are_their_methods_entry():
    for name, ovr in METHODS.items():
        assert method_overrides(name) == tuple(ovr)


def test_leap_on_top_of_a_head_puts_leap_last():
    assert method_overrides("leap_full+elasticface_cos") == (
        "leap.mode=off", "head.margin.kind=elasticface_cos", "head.margin.sigma=0.05",
        "leap.mode=full")
    # Order of writing does not matter: the LEAP part always comes last and wins.
    assert method_overrides("elasticface_cos+leap_full") == \
        method_overrides("leap_full+elasticface_cos")
    assert method_overrides("adaface+uniform_control-width3") == (
        "leap.mode=off", "head.margin.kind=adaface", "head.margin.m_arc=0.4",
        "leap.mode=full", "leap.control=uniform", "leap.width_scale=3")


@pytest.mark.parametrize("spec, extra", [
    ("class_balanced-beta0.999", "head.class_balance_beta=0.999"),
    ("repeat_factor-t0.001", "data.repeat_factor_threshold=0.001"),
    ("logit_adjust-tau1.5", "head.logit_adjust_tau=1.5"),
    ("elasticface_arc-sigma0.1", "head.margin.sigma=0.1"),
    ("leap_full-width20", "leap.width_scale=20"),
    ("ldam_drw-beta0.999", "head.class_balance_beta=0.999"),
])
def test_a_knob_appends_its_override_after_the_methods(spec, extra):
    base = spec.split("-")[0]
    assert method_overrides(spec) == tuple(METHODS[base]) + (extra,)


@pytest.mark.parametrize("spec, msg", [
    ("cosfce", "unknown method"),
    ("leap_full+uniform_control", "one head or remedy with one LEAP"),
    ("adaface+curricularface", "one head or remedy with one LEAP"),
    ("cosface-beta0.9", "-beta .* applies to class_balanced, ldam_drw only"),
    ("leap_full-width", "not a knob and value"),
    ("leap_full-width3-width4", "given twice"),
    ("leap_full-lambda3", "not a knob and value"),
])
def test_bad_specs_fail_with_a_message(spec, msg):
    with pytest.raises(ValueError, match=msg):
        method_overrides(spec)
    with pytest.raises(ValueError, match=msg):
        JobSettings(methods=("cosface", spec))


def test_cycle_sets_three_cycles_of_a_repeat_factor_variant():
    assert method_overrides("repeat_factor-t0.001-cycle3") == tuple(METHODS["repeat_factor"]) + (
        "data.repeat_factor_threshold=0.001", "train.epochs=9", "schedule.cycle_epochs=3")
    with pytest.raises(ValueError, match="whole number"):
        method_overrides("repeat_factor-cycle1.5")
    with pytest.raises(ValueError, match="applies to repeat_factor only"):
        method_overrides("cosface-cycle3")


def test_job_settings_accept_specs():
    s = JobSettings(methods=("cosface", "leap_full+elasticface_cos", "class_balanced-beta0.9"))
    assert s.methods[1] == "leap_full+elasticface_cos"
