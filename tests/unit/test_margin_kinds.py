"""Margin kinds: the registry, config errors, the per-sample margin stream, checkpoint state.

Values and gradients of every kind against the papers' equations, sharded, are in
tests/distributed/test_margin_kinds_dist.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain.config import MARGIN_KINDS, ConfigError, MarginConfig, load_config
from facetrain.dist import single_process
from facetrain.config import HeadConfig, LeapConfig
from facetrain.heads import noise
from facetrain.heads.kinds import build_margin, margin_kinds
from facetrain.heads.kinds.elasticface import SALT
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
    assert [(r["head"], r["leap"]) for r in rows] == [
        (h, leap) for leap in ("off", "on") for h in ("cosface", "adaface", "subcenter")]
    assert all((r["vs_cosface_pct"] is None) == (r["head"] == "cosface") for r in rows)
    assert "| adaface | 300 | 0.5 | on |" in capsys.readouterr().out
