"""Optimizers and learning-rate schedules against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain.config import ConfigError, load_config
from facetrain.optim import LRSchedule, SampledRowSGD, build_head_optimizer, build_optimizer


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
    lrs = [s.lr_at(k) for k in range(120)]
    cycle = 40
    for k in range(3):                                          # three identical triangles
        assert lrs[k * cycle] == pytest.approx(0.001)           # each cycle starts at the floor
        assert lrs[k * cycle + cycle // 2] == pytest.approx(0.1)    # peaks in the middle
        assert lrs[k * cycle + 10] == pytest.approx(0.001 + 0.099 * 0.5)
    assert lrs[:cycle] == lrs[cycle:2 * cycle]


def test_step_decay_and_constant():
    s = _sched(["schedule.name=step", "schedule.milestones=[2,5]", "schedule.gamma=0.1"])
    assert s.lr_at(19) == pytest.approx(0.1)
    assert s.lr_at(20) == pytest.approx(0.01) and s.lr_at(49) == pytest.approx(0.01)
    assert s.lr_at(50) == pytest.approx(0.001)
    assert _sched(["schedule.name=constant"]).lr_at(77) == 0.1


def test_apply_sets_every_group():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(load_config(None, []).optim, [w])
    s = _sched(["schedule.name=step", "schedule.milestones=[1]"])
    assert s.apply([opt], 15) == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


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


# ---- SampledRowSGD (head.update_rows=sampled) ---------------------------------------------------

def test_sampled_row_sgd_on_a_dense_gradient_is_torch_sgd_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 4, generator=g))
    ref = torch.nn.Parameter(w.detach().clone())
    mine = SampledRowSGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch_sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        x = torch.randn(10, 4, generator=g)
        for p, opt in ((w, mine), (ref, torch_sgd)):
            (p * x).sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(w.detach(), ref.detach())
    assert torch.equal(mine.state[w]["momentum_buffer"], torch_sgd.state[ref]["momentum_buffer"])


def test_sampled_row_sgd_moves_only_the_rows_of_a_sparse_gradient():
    """Reference: a per-row loop in numpy; a row not in the step's gradient keeps its weight and
    its momentum (no decay), and a row given twice in an uncoalesced gradient gets the sum."""
    lr, mom, wd = 0.5, 0.9, 0.01
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64))
    opt = SampledRowSGD([w], lr=lr, momentum=mom, weight_decay=wd)
    ref_w, ref_buf = w.detach().numpy().copy(), np.zeros((6, 3))
    steps = [[1, 4], [4, 0, 4], [2]]                       # row 4 twice in step 2
    for rows in steps:
        vals = torch.randn(len(rows), 3, generator=g, dtype=torch.float64)
        w.grad = torch.sparse_coo_tensor(torch.tensor([rows]), vals, (6, 3), check_invariants=True)
        opt.step()
        summed = {}
        for r, v in zip(rows, vals.numpy()):
            summed[r] = summed.get(r, 0) + v
        for r, v in summed.items():
            d = v + wd * ref_w[r]
            ref_buf[r] = mom * ref_buf[r] + d
            ref_w[r] -= lr * ref_buf[r]
        np.testing.assert_allclose(w.detach().numpy(), ref_w, rtol=0, atol=1e-14)
    np.testing.assert_allclose(opt.state[w]["momentum_buffer"].numpy(), ref_buf, atol=1e-14)
    assert not ref_buf[3].any() and torch.equal(w.detach()[3], torch.from_numpy(ref_w[3]))


def test_update_rows_config():
    cfg = load_config(None, ["head.update_rows=sampled", "head.sample_rate=0.1"])
    w = torch.nn.Parameter(torch.zeros(3, 2))
    assert isinstance(build_head_optimizer(cfg, [w]), SampledRowSGD)
    assert type(build_head_optimizer(load_config(None, []), [w])) is torch.optim.SGD
    with pytest.raises(ConfigError, match="head.update_rows=sampled .* optim.name is 'adamw': "
                                          "use optim.name=sgd"):
        load_config(None, ["head.update_rows=sampled", "optim.name=adamw"])
    with pytest.raises(ConfigError, match="head.update_rows must be one of"):
        load_config(None, ["head.update_rows=some"])
