"""The margin kinds inside the trainer (one process, seconds): a stopped-and-resumed run repeats
the uninterrupted loss sequence and running statistics, with LEAP and sampled-row updates; every
kind trains a step in bf16 and fp16 autocast with finite loss and gradients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_train_data import COUNTS, make_tiny_rec, tiny_config
from facetrain.config import MARGIN_KINDS, HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import single_process
from facetrain.heads.partial_fc import PartialFC
from facetrain.logging_utils import read_metrics
from facetrain.trainer import Trainer

EXTRA = {"elasticface_arc": ["head.margin.sigma=0.05"], "elasticface_cos": ["head.margin.sigma=0.05"],
         "subcenter": ["head.margin.subcenters=3"], "magface": ["head.margin.lambda_g=35"]}


def _losses(out: Path):
    m = read_metrics(out / "metrics.jsonl")
    return [m[k]["loss"] for k in sorted(m)]


@pytest.mark.parametrize("kind", ["adaface", "curricularface", "elasticface_cos"])
def test_stopped_and_resumed_run_repeats_itself(tmp_path, kind):
    rec = make_tiny_rec(tmp_path / "data")
    extra = [f"head.margin.kind={kind}", "head.margin.m_arc=0.3", "head.margin.stat_momentum=0.2",
             "head.sample_rate=0.5", "head.update_rows=sampled", "leap.start_epoch=0",
             *EXTRA.get(kind, [])]
    ctx = single_process()
    a = Trainer(tiny_config(rec, tmp_path / "a", extra), ctx)
    a.fit(stop_after=9)
    Trainer(tiny_config(rec, tmp_path / "b", extra), ctx).fit(stop_after=4)
    b = Trainer(tiny_config(rec, tmp_path / "b", extra), ctx)
    b.fit(stop_after=9)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a.head.margin.state_dict().keys() == b.head.margin.state_dict().keys()
    for k, v in a.head.margin.state_dict().items():
        assert torch.equal(v, b.head.margin.state_dict()[k]), k
    assert int(a.head.noise_counter) == int(b.head.noise_counter) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kind_in_mixed_precision(dtype):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 32, generator=g) * 20
    labels = torch.randint(0, len(COUNTS), (16,), generator=g)
    for kind in MARGIN_KINDS:
        fields = {"subcenters": 3} if kind == "subcenter" else {}
        fields.update({"sigma": 0.05} if kind.startswith("elastic") else {})
        fields.update({"lambda_g": 35.0} if kind == "magface" else {})
        head = PartialFC(32, np.array(COUNTS), HeadConfig(0.5, MarginConfig(kind, **fields),
                                                          logit_adjust_tau=1.0),
                         LeapConfig(mode="full", start_epoch=0), single_process()).train()
        x = emb.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = head(x.to(dtype), labels)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), kind
        assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all(), kind
