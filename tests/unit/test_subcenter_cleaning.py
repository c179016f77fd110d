"""Sub-center ArcFace's cleaning step (facetrain.heads.kinds.subcenter.dominant_subcenters)
against a float64 reference of the paper's rule (Deng et al., ECCV 2020), and the
class-block conversion that retrains the dominant rows as ArcFace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import single_process
from facetrain.heads.kinds.subcenter import dominant_block_state, dominant_subcenters
from facetrain.heads.partial_fc import PartialFC

C, K, D = 7, 3, 8


def _data(seed=0):
    """Class j's samples sit near sub-centre (j % K) mostly, a few near another, a few are
    noise pointing away; class 6 has no sample."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, K, D, generator=g, dtype=torch.float64)
    feats, labels = [], []
    for j in range(C - 1):
        dom = j % K
        for k, n in ((dom, 6), ((dom + 1) % K, 2)):
            feats.append(weight[j, k] / weight[j, k].norm() * 10 + 0.2 * torch.randn(n, D, generator=g,
                                                                                  dtype=torch.float64))
            labels += [j] * n
        feats.append(-weight[j, dom].unsqueeze(0) + 0.1 * torch.randn(1, D, generator=g,
                                                                     dtype=torch.float64))
        labels.append(j)                                  # noise: ~180 degrees from the dominant
    return weight, torch.cat(feats), torch.tensor(labels)


def _reference(weight, feats, labels, max_deg):
    """The paper's rule in float64 numpy: nearest sub-centre per sample, the most chosen one per
    class (lowest index on ties or no sample), keep samples within max_deg of it."""
    w = weight.numpy() / np.linalg.norm(weight.numpy(), axis=2, keepdims=True)
    f = feats.numpy() / np.linalg.norm(feats.numpy(), axis=1, keepdims=True)
    y = labels.numpy()
    counts = np.zeros((C, K), dtype=np.int64)
    for n in range(len(y)):
        counts[y[n], int(np.argmax(w[y[n]] @ f[n]))] += 1
    dom = np.array([int(np.argmax(counts[j])) for j in range(C)])
    ang = np.degrees(np.arccos(np.clip([w[y[n], dom[y[n]]] @ f[n] for n in range(len(y))], -1, 1)))
    return dom, ang <= max_deg, counts


@pytest.mark.parametrize("max_deg, chunk", [(75.0, 65536), (20.0, 5)])
def test_dominant_subcenters_match_the_papers_rule(max_deg, chunk):
    weight, feats, labels = _data()
    out = dominant_subcenters(weight.float(), feats.float(), labels, max_deg, chunk=chunk)
    dom, keep, counts = _reference(weight, feats, labels, max_deg)
    assert out.index.tolist() == dom.tolist() and out.index[C - 1] == 0     # empty class -> 0
    assert out.nearest.tolist() == counts.tolist()
    assert out.keep.tolist() == keep.tolist()
    assert (~out.keep).sum() >= C - 1                     # every class's noisy sample dropped
    torch.testing.assert_close(out.weight, weight.float()[torch.arange(C), torch.as_tensor(dom)])


def test_dominant_subcenters_bad_input_names_the_argument():
    weight, feats, labels = _data()
    with pytest.raises(ValueError, match=r"weight must be \[C, K, D\]; got \(7, 8\)"):
        dominant_subcenters(weight[:, 0], feats, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\); got \[1, 9\]"):
        dominant_subcenters(weight, feats, torch.where(labels == 0, 9, labels))


def test_dominant_block_state_retrains_as_arcface_on_any_world_size():
    counts = np.full(C, 3)
    sub = PartialFC(D, counts, HeadConfig(1.0, MarginConfig("subcenter", subcenters=K)),
                    LeapConfig(mode="off"), single_process())
    _, feats, labels = _data()
    out = dominant_subcenters(sub.weight, feats.float(), labels)
    # Saved on two ranks (resharded), converted block by block, resumed on one as ArcFace.
    blocks = [dominant_block_state(s, out.index)
              for s in PartialFC.reshard([sub.state_dict()], 2)]
    arc = PartialFC(D, counts, HeadConfig(1.0, MarginConfig("arcface")), LeapConfig(mode="off"),
                    single_process())
    arc.load_state_dict(blocks, 1)
    assert torch.equal(arc.weight.detach(), sub.weight.detach()[torch.arange(C), out.index])
    assert torch.equal(arc.weight.detach(), out.weight)
    with pytest.raises(ValueError, match="not a sub-center ArcFace block"):
        dominant_block_state(arc.state_dict(), out.index)
