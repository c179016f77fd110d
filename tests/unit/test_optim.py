"""Optimizers and learning-rate schedules against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from facetrain.config import ConfigError, load_config
from facetrain.optim import LRSchedule, build_optimizer, cycle_start_epoch, lr_curve


def _sched(overrides, base_lr=0.1, steps_per_epoch=10, total=100):
    cfg = load_config(None, overrides)
    return LRSchedule(cfg.schedule, base_lr, steps_per_epoch, total)


def test_poly_with_warmup():
    s = _sched(["schedule.name=poly", "schedule.warmup_epochs=1", "schedule.power=2"])
    assert s.lr_at(0) == pytest.approx(0.01) and s.lr_at(9) == pytest.approx(0.1)
    assert s.lr_at(10) == pytest.approx(0.1)                    # warm-up done, t = 0
    assert s.lr_at(55) == pytest.approx(0.1 * 0.5 ** 2)         # half way through the decay
    assert s.lr_at(100) == pytest.approx(0.0)


def test_triangular_cycles_and_leap_start():
    s = _sched(["schedule.name=cyclic", "schedule.cycle_epochs=10", "schedule.min_lr=0.001"],
               steps_per_epoch=4, total=120)
    lrs = lr_curve(s, 120)
    cycle = 40
    for k in range(3):                                          # three identical triangles
        assert lrs[k * cycle] == pytest.approx(0.001)           # each cycle starts at the floor
        assert lrs[k * cycle + cycle // 2] == pytest.approx(0.1)    # peaks in the middle
        assert lrs[k * cycle + 10] == pytest.approx(0.001 + 0.099 * 0.5)
    assert lrs[:cycle] == lrs[cycle:2 * cycle]
    cfg = load_config(None, ["schedule.name=cyclic", "schedule.cycle_epochs=10"]).schedule
    assert cycle_start_epoch(cfg, 2) == 20                      # the paper's LEAP start


def test_step_decay_and_constant():
    s = _sched(["schedule.name=step", "schedule.milestones=[2,5]", "schedule.gamma=0.1"])
    assert s.lr_at(19) == pytest.approx(0.1)
    assert s.lr_at(20) == pytest.approx(0.01) and s.lr_at(49) == pytest.approx(0.01)
    assert s.lr_at(50) == pytest.approx(0.001)
    assert _sched(["schedule.name=constant"]).lr_at(77) == 0.1


def test_apply_sets_every_group_and_state_roundtrip():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(load_config(None, []).optim, [w])
    s = _sched(["schedule.name=step", "schedule.milestones=[1]"])
    assert s.apply([opt], 15) == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    s2 = _sched(["schedule.name=step", "schedule.milestones=[1]"])
    s2.load_state_dict(s.state_dict())
    assert s2.step_count == 15


def test_no_steps_per_epoch_is_an_error():
    with pytest.raises(ConfigError, match="at least one optimizer step per epoch"):
        _sched([], steps_per_epoch=0)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("adam", torch.optim.Adam)])
def test_build_optimizer(name, cls):
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.1",
                             "optim.momentum=0.8", "optim.betas=[0.5,0.9]"]).optim
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3)), frozen])
    assert isinstance(opt, cls) and len(opt.param_groups[0]["params"]) == 1
    g = opt.param_groups[0]
    assert g["lr"] == 0.01 and g["weight_decay"] == 0.1
    if name == "sgd":
        assert g["momentum"] == 0.8
    else:
        assert tuple(g["betas"]) == (0.5, 0.9)
