"""Margin kinds: the registry, config errors, the per-sample margin stream, checkpoint state.

Values and gradients of every kind against the papers' equations, sharded, are in
tests/distributed/test_margin_kinds_dist.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facetrain.config import MARGIN_KINDS, ConfigError, MarginConfig, load_config
from facetrain.dist import single_process
from facetrain.config import HeadConfig, LeapConfig
from facetrain.heads import noise
from facetrain.heads.kinds import build_margin, margin_kinds
from facetrain.heads.kinds.elasticface import SALT
from facetrain.heads.margins import StepInputs, margin_logits
from facetrain.heads.partial_fc import PartialFC


def test_registry_and_config_list_the_same_kinds():
    assert margin_kinds() == sorted(MARGIN_KINDS)
    for kind in MARGIN_KINDS:
        assert build_margin(MarginConfig(kind)).scale == 64.0


@pytest.mark.parametrize("override, message", [
    ("head.margin.m_arc=-0.1", r"head.margin.m_arc must be in \[0.0, 3.1416\]; got -0.1"),
    ("head.margin.m_cos=-0.2", r"head.margin.m_cos must be in \[0.0, 1.0\]; got -0.2"),
    ("head.margin.sigma=-0.05", r"head.margin.sigma must be in \[0.0, inf\]; got -0.05"),
    ("head.margin.h=0", r"head.margin.h must be in \(0.0, inf\]; got 0.0"),
    ("head.margin.stat_momentum=0", r"head.margin.stat_momentum must be in \(0.0, 1.0\]; got 0.0"),
    ("head.margin.kind=sphereface", "head.margin.kind must be one of cosface, arcface, combined, "
                                    "elasticface_arc, elasticface_cos, curricularface, adaface"),
])
def test_bad_margin_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_meaningless_combinations_name_both_fields():
    with pytest.raises(ConfigError, match=r"head.margin.sigma=0.05 .*head.margin.kind is 'arcface'"):
        load_config(None, ["head.margin.kind=arcface", "head.margin.sigma=0.05"])
    with pytest.raises(ConfigError, match=r"head.margin.kind=adaface .*data.batch_size=1"):
        load_config(None, ["head.margin.kind=adaface", "data.batch_size=1"])
    load_config(None, ["head.margin.kind=elasticface_cos", "head.margin.sigma=0.05"])


def test_elastic_margin_stream_is_normal_and_independent_of_leap():
    counter = torch.tensor(4)
    z = noise.sample_gauss(7, counter, 20000, SALT)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    rk, ck = noise.noise_keys(7, counter, 20000, None)           # LEAP's per-sample angles
    leap = noise.gauss(rk, ck).view(-1)
    assert abs(torch.corrcoef(torch.stack([z, leap]))[0, 1]) < 0.03
    # Keyed on the position in the global batch: a longer batch extends, never reshuffles.
    assert torch.equal(noise.sample_gauss(7, counter, 100, SALT), z[:100])
    assert not torch.equal(noise.sample_gauss(7, torch.tensor(5), 100, SALT), z[:100])


def test_margin_state_in_checkpoints_and_kind_mismatch():
    counts = np.full(10, 3)
    cfg = HeadConfig(1.0, MarginConfig("curricularface"))
    head = PartialFC(4, counts, cfg, LeapConfig(mode="off"), single_process()).train()
    head(torch.randn(6, 4), torch.arange(6))
    state = head.state_dict()
    assert state["margin_kind"] == "curricularface" and float(state["margin"]["t"]) != 0.0
    other = PartialFC(4, counts, cfg, LeapConfig(mode="off"), single_process())
    other.load_state_dict([state], 1)
    assert float(other.margin.t) == float(head.margin.t)
    # A checkpoint of another kind (or an older one without margin state) starts afresh.
    ada = PartialFC(4, counts, HeadConfig(1.0, MarginConfig("adaface")), LeapConfig(mode="off"),
                    single_process())
    ada.load_state_dict([state], 1)
    assert float(ada.margin.norm_mean) == 20.0
    with pytest.raises(ValueError, match="curricularface expects margin state"):
        other.margin.load_state_dict({"norm_mean": torch.tensor(1.0)}, "ckpt")


def test_subcenter_config_and_checkpoint_shape():
    with pytest.raises(ConfigError, match=r"head.margin.subcenters must be in \[1, inf\]; got 0"):
        load_config(None, ["head.margin.kind=subcenter", "head.margin.subcenters=0"])
    with pytest.raises(ConfigError, match=r"head.margin.subcenters=3 .*head.margin.kind is 'arcface'"):
        load_config(None, ["head.margin.kind=arcface", "head.margin.subcenters=3"])
    counts = np.full(10, 3)
    sub = PartialFC(4, counts, HeadConfig(1.0, MarginConfig("subcenter", subcenters=3)),
                    LeapConfig(mode="off"), single_process())
    assert tuple(sub.weight.shape) == (10, 3, 4)
    # The K = 3 rows of class c are rows 3c..3c+2 of the K = 1 initialisation's stream.
    plain = PartialFC(4, np.full(30, 3), HeadConfig(1.0, MarginConfig("arcface")),
                      LeapConfig(mode="off"), single_process())
    assert torch.equal(sub.weight.detach().reshape(30, 4), plain.weight.detach())
    one = PartialFC(4, counts, HeadConfig(1.0, MarginConfig("subcenter")), LeapConfig(mode="off"),
                    single_process())
    with pytest.raises(ValueError, match=r"weight is \(10, 3, 4\) but this head's is \(10, 4\); "
                                         "resume with the same head.margin.subcenters"):
        one.load_state_dict([sub.state_dict()], 1)


def test_magface_config_errors():
    with pytest.raises(ConfigError, match=r"head.margin.lambda_g=35.0 .*head.margin.kind is 'cosface'"):
        load_config(None, ["head.margin.lambda_g=35"])
    with pytest.raises(ConfigError, match=r"head.margin.mag_a_max=10.0 must be above "
                                          r"head.margin.mag_a_min=10.0"):
        load_config(None, ["head.margin.kind=magface", "head.margin.mag_a_max=10"])
    with pytest.raises(ConfigError, match=r"head.margin.mag_m_max=0.3 must be at least "
                                          r"head.margin.mag_m_min=0.45"):
        load_config(None, ["head.margin.kind=magface", "head.margin.mag_m_max=0.3"])
    with pytest.raises(ConfigError, match=r"head.margin.lambda_g must be in \[0.0, inf\]; got -1.0"):
        load_config(None, ["head.margin.kind=magface", "head.margin.lambda_g=-1"])


def test_long_tail_options_config_errors_and_counts():
    with pytest.raises(ConfigError, match=r"head.class_balance_start_epoch=3 defers .*"
                                          r"head.class_balance_beta is 0"):
        load_config(None, ["head.class_balance_start_epoch=3"])
    with pytest.raises(ConfigError, match=r"head.logit_adjust_tau must be in \[0.0, inf\]; got -1.0"):
        load_config(None, ["head.logit_adjust_tau=-1"])
    with pytest.raises(ConfigError, match=r"head.interclass_filter must be in \[0.0, 1.0\); got 1.0"):
        load_config(None, ["head.interclass_filter=1.0"])
    with pytest.raises(ConfigError, match=r"head.margin.ldam_max_m must be in \[0.0, 1.0\]; got -0.5"):
        load_config(None, ["head.margin.kind=ldam", "head.margin.ldam_max_m=-0.5"])
    with pytest.raises(ValueError, match=r"head.logit_adjust_tau=1.0 needs the class counts"):
        PartialFC(4, np.zeros(10, dtype=int), HeadConfig(logit_adjust_tau=1.0),
                  LeapConfig(mode="off"), single_process())


def test_deferred_reweighting_starts_at_its_epoch():
    counts = np.array([1, 50, 3, 7, 200, 2])
    emb, lab = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 6
    plain = PartialFC(4, counts, HeadConfig(), LeapConfig(mode="off"), single_process())
    drw = PartialFC(4, counts, HeadConfig(class_balance_beta=0.999, class_balance_start_epoch=2),
                    LeapConfig(mode="off"), single_process())
    drw.set_epoch(1)
    assert torch.equal(drw(emb, lab), plain(emb, lab))
    drw.set_epoch(2)
    assert not torch.equal(drw(emb, lab), plain(emb, lab))


def test_elastic_draws_once_per_training_forward_and_not_in_eval():
    head = PartialFC(4, np.full(10, 3), HeadConfig(1.0, MarginConfig("elasticface_arc", sigma=0.1)),
                     LeapConfig(mode="off"), single_process()).train()
    emb, lab = torch.randn(6, 4), torch.arange(6)
    head(emb, lab)
    first = head.margin.margin_n.clone()
    head(emb, lab)
    assert int(head.noise_counter) == 2 and not torch.equal(first, head.margin.margin_n)
    torch.testing.assert_close(first, 0.5 + 0.1 * noise.sample_gauss(head._noise_seed,
                                                                      torch.tensor(0), 6, SALT))
    head.eval()
    head(emb, lab)
    assert int(head.noise_counter) == 2 and torch.equal(head.margin.margin_n, torch.full((6,), 0.5))


def test_classifier_bench_times_heads_against_cosface(tmp_path, capsys):
    import json
    from benchmarks.classifier_bench import main
    out = tmp_path / "rows.json"
    main(["--heads", "adaface", "subcenter", "--classes", "300", "--sample-rates", "0.5",
          "--steps", "1", "--warmup", "1", "--dim", "16", "--json", str(out)])
    rows = json.loads(out.read_text())
    # Sub-center ArcFace brings its same-size reference: CosFace with K x the classes.
    assert [(r["head"], r["leap"], r["classes"]) for r in rows] == [
        (h, leap, 900 if h == "cosface_rows" else 300) for leap in ("off", "on")
        for h in ("cosface", "adaface", "subcenter", "cosface_rows")]
    assert all((r["vs_cosface_pct"] is None) == (r["head"] == "cosface") for r in rows)
    for r in rows:
        if r["head"] != "cosface":
            assert r["vs_cosface_min_pct"] <= r["vs_cosface_pct"] <= r["vs_cosface_max_pct"]
        assert (r["vs_ref_pct"] is not None) == (r["head"] == "subcenter")
    out = capsys.readouterr().out
    assert "| adaface | 300 | 0.5 | on |" in out and "| subcenter (K=3) | 300 |" in out
    assert "load average before" in out


@pytest.mark.parametrize("cos_y", [0.99995, 0.9993, -0.9996, 0.3])
def test_adaface_target_is_the_released_codes_near_one(cos_y):
    """AdaFace's released code clamps the target cosine to [-1 + 1e-3, 1 - 1e-3] before arccos
    (no gradient beyond) and clips the angle to [1e-3, pi - 1e-3]: a float64 reference of that
    code, value and gradient, for targets at and inside the clamp."""
    m, h = 0.4, 0.333
    kind = build_margin(MarginConfig("adaface", 64.0, 0.0, m, h=h, stat_momentum=0.5))
    norms = torch.tensor([3.0, 18.0, 40.0, 25.0])
    cos = torch.full((4, 3), 0.1).index_put_((torch.arange(4), torch.tensor([0, 1, 2, 0])),
                                             torch.tensor(cos_y)).requires_grad_(True)
    col, local = torch.tensor([0, 1, 2, 0]), torch.ones(4, dtype=torch.bool)
    inputs = StepInputs(col, norms, torch.tensor(0), 1, None, True)
    out = margin_logits(cos, col, local, kind, None, inputs)
    out.gather(1, col.view(-1, 1)).sum().backward()
    # Reference: the released code's forward with batch_mean 20, batch_std 100 moved by r = 0.5.
    n = norms.double()
    mu, sd = 0.5 * n.mean() + 0.5 * 20.0, 0.5 * n.std() + 0.5 * 100.0
    zhat = (h * (n - mu) / (sd + 1e-3)).clamp(-1, 1)
    c = torch.tensor([cos_y] * 4, dtype=torch.float64, requires_grad=True)
    theta = torch.acos(c.clamp(-1 + 1e-3, 1 - 1e-3))
    ref = 64.0 * (torch.cos((theta - m * zhat).clamp(1e-3, math.pi - 1e-3)) - (m + m * zhat))
    ref.sum().backward()
    got = out.detach().gather(1, col.view(-1, 1)).squeeze(1).double()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-4)
    grad = cos.grad.gather(1, col.view(-1, 1)).squeeze(1).double()
    torch.testing.assert_close(grad, c.grad, rtol=1e-4, atol=1e-3)
    if abs(cos_y) > 1 - 1e-3:
        assert torch.all(grad == 0)


@pytest.mark.parametrize("override, message", [
    # The issue's list: a negative margin (each kind's margin field), sigma < 0, K < 1.
    ("head.margin.mag_m_min=-0.1", r"head.margin.mag_m_min must be in \[0.0, 3.1416\]; got -0.1"),
    ("head.margin.mag_m_max=-0.1", r"head.margin.mag_m_max must be in \[0.0, 3.1416\]; got -0.1"),
    ("head.margin.ldam_max_m=-0.5", r"head.margin.ldam_max_m must be in \[0.0, 1.0\]; got -0.5"),
    ("head.margin.sigma=-1", r"head.margin.sigma must be in \[0.0, inf\]; got -1.0"),
    ("head.margin.subcenters=-2", r"head.margin.subcenters must be in \[1, inf\]; got -2"),
    ("head.interclass_filter=-0.3", r"head.interclass_filter must be in \[0.0, 1.0\); got -0.3"),
    ("head.margin.scale=0", r"head.margin.scale must be in \(0.0, inf\]; got 0.0"),
])
def test_issue_bad_values_are_config_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["head.margin.kind=subcenter", override] if "subcenters" in override
                    else [override])


def test_class_count_heads_need_class_counts():
    """tau (logit adjustment) and LDAM's per-class margin without class counts: one error at
    start naming the field, not a silent uniform prior / margin."""
    none = np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match=r"head.logit_adjust_tau=0.5 needs the class counts"):
        PartialFC(4, none, HeadConfig(logit_adjust_tau=0.5), LeapConfig(mode="off"),
                  single_process())
    with pytest.raises(ValueError, match=r"head.margin.kind=ldam sets each class's margin from "
                                         r"the class counts K_i, but the training data reports none"):
        PartialFC(4, none, HeadConfig(margin=MarginConfig("ldam")), LeapConfig(mode="off"),
                  single_process())


def test_interclass_filter_is_masked_fill_bit_for_bit():
    """The filter (an in-place multiply by a 0/1 mask) equals the masked_fill formulation bit for
    bit, values and gradients, also for rows whose class is on another shard (their column 0 is
    an ordinary column: filtered like any other)."""
    thr = 0.3
    head = PartialFC(4, np.full(10, 3), HeadConfig(interclass_filter=thr), LeapConfig(mode="off"),
                     single_process())
    g = torch.Generator().manual_seed(5)
    base = torch.rand(6, 40, generator=g) * 1.4 - 0.7
    col = torch.tensor([3, 0, 7, 0, 39, 12])
    local = torch.tensor([True, True, False, False, True, True])
    base[0, 3] = base[1, 0] = base[2, 7] = base[3, 0] = 0.9      # targets (and column 0) above
    up = torch.randn(6, 40, generator=g)
    a = base.clone().requires_grad_(True)
    out = head._filter_interclass(a * 1.0, col, local)
    out.backward(up)
    b = base.clone().requires_grad_(True)
    onehot = torch.zeros(6, 40, dtype=torch.bool)
    onehot[torch.arange(6)[local], col[local]] = True
    ref = b.masked_fill((b.detach() > thr) & ~onehot, 0.0)
    ref.backward(up)
    assert torch.equal(out.detach().view(torch.int32), ref.detach().view(torch.int32))
    assert torch.equal(a.grad, b.grad)
    assert out[0, 3] == base[0, 3] and out[2, 7] == 0 and out[3, 0] == 0


def _curricular_block(dtype, s, seed=0):
    """A scaled block x [6, 50] in `dtype`, bounds s T_n [6, 1] (row 0: every entry hard, row 1:
    none, row 2: entries exactly at the bound, not hard) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    x = ((torch.rand(6, 50, generator=g) * 2 - 1) * s).to(dtype)
    bound = (torch.rand(6, 1, generator=g) * 1.2 - 0.6) * s
    bound[0], bound[1] = -2.0 * s, 2.0 * s
    x[2, :10] = bound[2].to(dtype)
    bound[2] = x[2, 0].float()               # the tie is exact in x's dtype
    return x, bound, torch.randn(6, 50, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [64.0, 30.0])
def test_curricular_modulation_is_the_old_formula_and_the_equation(dtype, s):
    """The fused node (`_HardNegatives`) against the plain-autograd formula it replaces: the same
    bits forward in every dtype; gradients equal to rounding. Both against float64 values and
    derivatives written from the equation: x (t + x / s) and t + 2 x / s where x > s T_n, x and 1
    elsewhere (s = 30: x / s is inexact)."""
    from facetrain.heads.kinds.curricularface import _HardNegatives
    x0, bound, up = _curricular_block(dtype, s)
    t = torch.tensor(0.3)
    old_x, new_x = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    old = torch.where(old_x.detach() > bound, old_x * (t + old_x / s), old_x)
    old.backward(up)
    new = _HardNegatives.apply(new_x, bound, t, s, True)
    new.backward(up)
    assert new.dtype == dtype and torch.equal(new_x.detach(), x0)      # not in place
    assert torch.equal(new.detach().view(torch.int8), old.detach().view(torch.int8))
    x, tt, u = x0.double(), 0.3, up.double()
    hard = x > bound.double()
    assert hard[0].all() and not hard[1].any() and not hard[2, :10].any()
    ref = torch.where(hard, x * (tt + x / s), x)
    ref_grad = u * torch.where(hard, tt + 2.0 * x / s, torch.ones_like(x))
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(new.detach().double(), ref, rtol=tol, atol=tol * s)
    for grad in (new_x.grad, old_x.grad):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * 10)
    if dtype == torch.float32:
        torch.testing.assert_close(new_x.grad, old_x.grad, rtol=1e-6, atol=1e-6)


def test_curricular_modulation_gradcheck_and_what_it_keeps():
    """float64 gradcheck of the fused node (entries at least 1e-3 from the bound, where the
    mask is constant under gradcheck's steps); it keeps one [B, C] tensor for its backward, and
    none when the block needs no gradient."""
    from facetrain.heads.kinds.curricularface import _HardNegatives
    x, bound, _ = _curricular_block(torch.float64, 30.0, seed=1)
    x[2] += 0.5                                          # off the tie
    assert (x - bound).abs().min() > 1e-3
    t = torch.tensor(0.3, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _HardNegatives.apply(v, bound, t, 30.0, True), (x,))
    out = _HardNegatives.apply(x, bound, t, 30.0, True)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == x.shape
    plain = _HardNegatives.apply(x.detach(), bound, t, 30.0, False)
    assert plain.grad_fn is None and torch.equal(plain, out.detach())
    kind = build_margin(MarginConfig("curricularface", 30.0))   # the kind's call, as the head's
    kind.t, kind.threshold = t, bound.view(-1) / 30.0
    with torch.no_grad():
        assert torch.equal(kind.others(x), out.detach())
    assert torch.equal(kind.others(x).detach(), out.detach())


def test_modulation_bench_runs(monkeypatch, capsys):
    """benchmarks/modulation_bench.py (RESULTS.md's CurricularFace micro-benchmark) on a tiny
    block: every variant timed in every round, the table printed with the load."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import modulation_bench
    ms = modulation_bench.main(["--classes", "300", "--rounds", "2", "--steps", "1",
                                "--warmup", "0"])
    assert list(ms) == ["cosface", "curricular_old", "curricular", "others_old", "others_fused"]
    assert all(len(v) == 2 and min(v) >= 0 for v in ms.values())
    out = capsys.readouterr().out
    assert "| curricular |" in out and "load average before" in out and "hard negatives" in out
