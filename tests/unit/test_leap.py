"""LEAP statistics and feature cloud on one process, against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import facetrain.heads.noise as noise
from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import single_process
from facetrain.heads.partial_fc import PartialFC

COUNTS = np.array([1, 2, 3, 5, 8, 13, 4, 6, 30, 2])


def _pooled_std(rings, cfg, counts):
    """Eq. 6 / Eq. 9 and the per-class std from the angles in the rings."""
    var = np.array([np.var(r, ddof=1) if len(r) >= 2 else 0.0 for r in rings.values()])
    valid = np.array([len(r) >= 2 for r in rings.values()])
    head = counts > cfg.head_threshold
    w = (head & valid) * 1.0 if cfg.mode == "vanilla" else (counts - 1) * valid   # Eq. 6 / 9
    pooled = (w * var).sum() / w.sum() if w.sum() > 0 else 0.0
    perturb = valid & (var < pooled) & (~head if cfg.mode == "vanilla" else True)
    return pooled, np.where(perturb, np.sqrt(np.clip(pooled - var, 0, None)), 0.0)


def _simulate(batches, cfg, counts, accum=1):
    """Direct reading of docs/leap.md "State": every batch writes its angles to the centre as
    it stands (classes without a centre write nothing), keeping the last S_i; every
    update_interval optimizer steps (of `accum` batches) the step's samples move the centres
    and the statistics are refreshed."""
    sizes = [max(1, math.ceil(k * cfg.memory_factor - 1e-9)) for k in counts]
    centres, rings = {}, {i: [] for i in range(len(counts))}
    pooled, std = 0.0, np.zeros(len(counts))
    for i, (emb, labels) in enumerate(batches):
        f = F.normalize(emb.double(), dim=1)
        for c in sorted(set(labels.tolist())):
            if c in centres:
                cn = F.normalize(centres[c], dim=0)
                rings[c] = (rings[c] + torch.acos((f[labels == c] @ cn).clamp(-1, 1)).tolist())[-sizes[c]:]
        step, last = divmod(i, accum)
        if last == accum - 1 and step % cfg.update_interval == 0:
            f = F.normalize(torch.cat([e for e, _ in batches[i - accum + 1:i + 1]]).double(), dim=1)
            lab = torch.cat([l for _, l in batches[i - accum + 1:i + 1]])
            for c in sorted(set(lab.tolist())):
                mean = f[lab == c].mean(0)
                centres[c] = mean if c not in centres else centres[c] + cfg.center_lr * (mean - centres[c])
            pooled, std = _pooled_std(rings, cfg, counts)
    mu = np.array([np.mean(r) if r else 0.0 for r in rings.values()])
    var = np.array([np.var(r, ddof=1) if len(r) >= 2 else 0.0 for r in rings.values()])
    valid = np.array([len(r) >= 2 for r in rings.values()])
    return centres, rings, mu, var, valid, pooled, std


@pytest.mark.parametrize("mode,interval,accum", [("full", 1, 1), ("vanilla", 1, 1), ("full", 3, 2),
                                                 ("vanilla", 2, 3)])
def test_statistics_equal_eq6_eq9_from_stored_angles(mode, interval, accum):
    cfg = LeapConfig(mode=mode, update_interval=interval, memory_factor=0.5, head_threshold=5,
                     center_lr=0.3)
    head = PartialFC(6, COUNTS, HeadConfig(), cfg, single_process(), seed=1, grad_accum=accum).train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=g) + 2.0 * torch.arange(6.0),
                torch.randint(0, 10, (16,), generator=g)) for _ in range(12 * accum)]
    for emb, labels in batches:
        head(emb, labels)
    centres, rings, mu, var, valid, pooled, std = _simulate(batches, cfg, COUNTS, accum)
    leap = head.leap
    assert head.leap_steps == 12 and head.calls == 12 * accum
    mean_h, var_h, valid_h = head.class_stats()
    np.testing.assert_array_equal(valid_h.numpy(), valid)
    np.testing.assert_allclose(mean_h.numpy(), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var_h.numpy(), var, rtol=1e-4, atol=1e-7)
    assert head.leap_summary()["pooled_var"] == pytest.approx(pooled, rel=1e-5)
    np.testing.assert_allclose(leap.class_std[:-1].numpy(), std, rtol=1e-4, atol=1e-6)
    for c, ring in rings.items():
        off, size = int(leap.mem_offset[c]), int(leap.mem_size[c])
        stored = leap.memory[off:off + min(int(leap.count[c]), size)]
        np.testing.assert_allclose(np.sort(stored.numpy()), np.sort(ring), rtol=1e-5, atol=1e-6)
        if c in centres:
            np.testing.assert_allclose(leap.centers[c].numpy(), centres[c].numpy(), rtol=1e-5, atol=1e-6)
    assert std.max() > 0 and (std == 0).any()


def test_angles_are_measured_before_the_update_and_every_iteration():
    """A class seen first stores no angle (it has no centre); afterwards each sample stores its
    angle to the centre as it stood before that batch, on non-update steps too."""
    counts = np.array([50, 4])
    cfg = LeapConfig(mode="full", update_interval=3, center_lr=0.1)
    head = PartialFC(3, counts, HeadConfig(), cfg, single_process()).train()
    e = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]),
         torch.tensor([[1.0, 1.0, 0.0]])]
    one = torch.tensor([1])
    head(e[0], one)                        # step 0 (update): first sight, centre = e0, no angle
    assert int(head.leap.count[1]) == 0 and bool(head.leap.seen[1])
    head(e[1], one)                        # step 1 (no update): angle to e0 = pi/2
    head(e[2], one)                        # step 2 (no update): angle to e0 = pi/4
    ring = head.leap.memory[int(head.leap.mem_offset[1]):][:2]
    torch.testing.assert_close(ring, torch.tensor([math.pi / 2, math.pi / 4]))
    torch.testing.assert_close(head.leap.centers[1], torch.tensor([1.0, 0.0, 0.0]))
    head(e[1], one)                        # step 3 (update): angle to e0, then the centre moves
    assert float(head.leap.memory[int(head.leap.mem_offset[1]) + 2]) == pytest.approx(math.pi / 2)
    torch.testing.assert_close(head.leap.centers[1], torch.tensor([0.9, 0.1, 0.0]))


def test_update_interval_counts_optimizer_steps():
    counts = np.array([50, 4])
    cfg = LeapConfig(mode="full", update_interval=2)
    head = PartialFC(3, counts, HeadConfig(), cfg, single_process(), grad_accum=4).train()
    g = torch.Generator().manual_seed(0)
    moves = []
    for _ in range(16):                    # 4 optimizer steps: centres move after steps 0 and 2
        before = head.leap.centers.clone()
        head(torch.randn(2, 3, generator=g), torch.tensor([0, 1]))
        moves.append(not torch.equal(before, head.leap.centers))
    assert [i for i, m in enumerate(moves) if m] == [3, 11]
    assert head.leap.refreshes == 2 and head.leap_steps == 4


def _orthogonal_head(cfg, counts, variances, margin=MarginConfig("cosface", 10.0, 0.2, 0.0)):
    """Class j's weight is e_j and the embeddings are e_{D-1}: every cosine is exactly 0, so a
    logit's angle is pi/2 + alpha and alpha can be read back."""
    c = len(counts)
    head = PartialFC(c + 1, counts, HeadConfig(1.0, margin), cfg, single_process()).train()
    with torch.no_grad():
        head.weight.copy_(torch.eye(c + 1)[:c])
        leap = head.leap
        n = torch.minimum(leap.mem_size[:-1], torch.full((c,), 20))
        leap.count[:-1] = n
        # Two-point rings with the chosen unbiased variance: sum = 0, sumsq = var * (n - 1).
        leap.sum[:-1] = 0.0
        leap.sumsq[:-1] = torch.tensor(variances, dtype=torch.float64) * (n - 1)
        leap.refresh(None)
    return head


def _angles(head, cls, n=400):
    emb = torch.zeros(n, head.embedding_size)
    emb[:, -1] = 1.0
    logits, _, _ = head.block_logits(emb, torch.full((n,), cls))
    other = torch.ones(logits.shape[1], dtype=torch.bool)
    other[cls] = False
    return torch.acos((logits[:, other] / 10.0).clamp(-1, 1)) - math.pi / 2


def test_perturbation_spread_and_who_is_perturbed():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    for mode in ("full", "vanilla"):
        cfg = LeapConfig(mode=mode, head_threshold=20)
        head = _orthogonal_head(cfg, counts, var)
        v = np.array(var)
        if mode == "full":
            pooled = ((counts - 1) * v).sum() / (counts - 1).sum()
            expect = np.where(v < pooled, np.sqrt(np.clip(pooled - v, 0, None)), 0.0)
        else:
            pooled = v[:3].mean()
            expect = np.where((v < pooled) & (counts <= 20), np.sqrt(np.clip(pooled - v, 0, None)), 0.0)
        assert head.leap_summary()["pooled_var"] == pytest.approx(pooled)
        for cls in range(6):
            a = _angles(head, cls)
            if expect[cls] == 0:
                assert torch.equal(a, torch.zeros_like(a)), (mode, cls)  # never perturbed
            else:
                assert a.std().item() == pytest.approx(expect[cls], rel=0.03), (mode, cls)
                assert abs(a.mean().item()) < 0.01
        # Head class 2 has a small variance: perturbed in full mode, never in vanilla.
        assert (expect[2] > 0) == (mode == "full")


def _leap_gaps(counts, var):
    v, k = np.array(var), counts - 1
    pooled = (k * v).sum() / k.sum()
    return np.where(v < pooled, pooled - v, 0.0)


def test_uniform_control_is_matched_and_sample_granularity():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    gaps = _leap_gaps(counts, var)
    shared = (counts * gaps).sum() / counts.sum()          # sum K var = sum K gap, all classes
    for lam in (1.0, 3.0):
        head = _orthogonal_head(LeapConfig(mode="full", control="uniform", width_scale=lam), counts, var)
        np.testing.assert_allclose(head.leap.class_std[:-1].double().numpy() ** 2,
                                   np.full(6, lam * shared), rtol=1e-6)
        summ = head.leap_summary()
        assert summ["noise_var"] == pytest.approx(summ["target_noise_var"], rel=1e-12)
        assert summ["target_noise_var"] == pytest.approx(lam * shared, rel=1e-12)
        for cls in (0, 4):                 # every class with valid stats, same spread
            assert _angles(head, cls).std().item() == pytest.approx(math.sqrt(lam * shared), rel=0.06)
    head = _orthogonal_head(LeapConfig(mode="full", alpha_granularity="sample"), counts, var)
    a = _angles(head, 3)
    assert torch.allclose(a, a[:, :1].expand_as(a), atol=1e-5) and a.std() > 0.01


def test_uniform_meangap_is_the_earlier_unmatched_control():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    gaps = _leap_gaps(counts, var)
    head = _orthogonal_head(LeapConfig(mode="full", control="uniform_meangap"), counts, var)
    np.testing.assert_allclose(head.leap.class_std[:-1].double().numpy() ** 2,
                               np.full(6, gaps[gaps > 0].mean()), rtol=1e-6)
    assert head.leap_summary()["noise_var"] > head.leap_summary()["target_noise_var"]


def test_shuffled_control_is_a_scaled_permutation_redrawn_each_refresh():
    counts = np.array([50, 40, 30, 3, 3, 3, 5, 8])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08, 0.02, 0.03]
    gaps = _leap_gaps(counts, var)
    head = _orthogonal_head(LeapConfig(mode="full", control="shuffled", width_scale=2.0), counts, var)
    perms = set()
    for _ in range(6):
        got = head.leap.class_std[:-1].double().numpy() ** 2 / 2.0
        scale = got.max() / gaps.max()
        np.testing.assert_allclose(np.sort(got), np.sort(gaps * scale), rtol=1e-5, atol=1e-12)
        assert (counts * got).sum() == pytest.approx((counts * gaps).sum(), rel=1e-6)
        perms.add(tuple(np.argsort(got, kind="stable")))
        head.leap.refresh(None)
    assert len(perms) > 1


def test_null_control_is_baseline_but_consumes_the_same_stream():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    heads = {c: _orthogonal_head(LeapConfig(mode="full", control=c), counts, var) for c in ("none", "null")}
    emb = torch.randn(8, 7, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 4, 0, 2, 3, 1, 5, 3])
    null_loss = heads["null"](emb, labels)
    heads["none"](emb, labels)
    base = _orthogonal_head(LeapConfig(mode="full"), counts, var).eval()(emb, labels)
    torch.testing.assert_close(null_loss, base, rtol=0, atol=0)
    assert int(heads["null"].noise_counter) == int(heads["none"].noise_counter) == 1


def test_zero_angles_give_the_baseline_loss(monkeypatch):
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    for margin in (MarginConfig("cosface", 10.0, 0.2, 0.0), MarginConfig("arcface", 10.0, 0.0, 0.4)):
        head = _orthogonal_head(LeapConfig(mode="full", update_interval=10**6), counts, var, margin)
        head.leap_steps = 1                # no centre update or refresh inside the compared steps
        g = torch.Generator().manual_seed(4)
        emb = torch.randn(12, 7, generator=g)
        labels = torch.tensor([3, 4, 0, 2, 3, 1, 5, 3, 2, 2, 0, 4])
        real = noise.gauss
        monkeypatch.setattr(noise, "gauss", lambda *a: torch.zeros_like(real(*a)))
        e1 = emb.clone().requires_grad_()
        loss = head(e1, labels)
        loss.backward()
        monkeypatch.setattr(noise, "gauss", real)
        assert head.leap.batch_std(labels, None).gt(0).sum() >= 4    # rows went the LEAP path
        head.set_epoch(-1)                 # before start_epoch: the plain baseline
        head.zero_grad()
        e2 = emb.clone().requires_grad_()
        base = head(e2, labels)
        base.backward()
        torch.testing.assert_close(loss, base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-5)


def test_finite_loss_and_grads_when_cosines_are_exactly_one():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    for kind in ("cosface", "arcface"):
        head = _orthogonal_head(LeapConfig(mode="full", update_interval=10**6), counts, var,
                                MarginConfig(kind, 64.0, 0.35, 0.5))
        head.leap_steps = 1
        emb = torch.eye(7)[[3, 4, 5, 3, 0]]          # cos = 1 to the target, 0 elsewhere
        emb2 = -torch.eye(7)[[3, 4]]                 # cos = -1 to class 3 / 4
        e = torch.cat([emb, emb2]).requires_grad_()
        labels = torch.tensor([3, 4, 5, 3, 0, 4, 3])
        loss = head(e, labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(e.grad).all() and torch.isfinite(head.weight.grad).all()


def test_before_start_epoch_and_in_eval_nothing_is_perturbed():
    counts = np.array([50, 50, 50, 3, 3, 3])
    var = [0.04, 0.05, 0.01, 0.01, 0.0, 0.08]
    head = _orthogonal_head(LeapConfig(mode="full", start_epoch=3), counts, var)
    assert torch.equal(_angles(head, 3), torch.zeros(400, 5))
    head.set_epoch(3)
    assert _angles(head, 3).std() > 0.05
    head.eval()
    assert torch.equal(_angles(head, 3), torch.zeros(400, 5))


def test_resume_and_reshard_continue_the_state_with_grad_accum_and_shuffled():
    """Stop between optimizer steps, save, reshard 1 -> 3 -> 1, load into a fresh head: the
    centres, memory, step counter and the shuffled control's permutation stream continue as if
    uninterrupted."""
    counts = np.arange(2, 14)
    cfg = LeapConfig(mode="full", update_interval=2, control="shuffled", memory_factor=0.5)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 12, (8,), generator=g))
               for _ in range(24)]
    full = PartialFC(6, counts, HeadConfig(), cfg, single_process(), seed=2, grad_accum=3).train()
    half = PartialFC(6, counts, HeadConfig(), cfg, single_process(), seed=2, grad_accum=3).train()
    for emb, lab in batches:
        full(emb, lab)
    for emb, lab in batches[:12]:          # 4 optimizer steps
        half(emb, lab)
    states = PartialFC.reshard([half.state_dict()], 3)
    resumed = PartialFC(6, counts, HeadConfig(), cfg, single_process(), seed=2, grad_accum=3).train()
    resumed.load_state_dict(states, 1)           # 3 saved shards -> 1
    assert resumed.leap_steps == 4 and resumed.leap.refreshes == 2
    for emb, lab in batches[12:]:
        resumed(emb, lab)
    assert resumed.leap.refreshes == full.leap.refreshes == 4 and full.leap.class_std.max() > 0
    for key in ("centers", "memory", "count", "sum", "sumsq", "class_std"):
        torch.testing.assert_close(getattr(resumed.leap, key), getattr(full.leap, key), msg=key)
    torch.testing.assert_close(resumed.leap.globals, full.leap.globals)


def test_reshard_moves_every_per_class_leap_tensor():
    """Every per-class LEAP tensor of a checkpoint (a mid-run one: class_std set, rings part
    full) lands on the new owner of its class, resharded 1 -> 3: the rows and the ring slices
    taken by hand from the single shard (12 classes over 3 ranks: [0, 4), [4, 8), [8, 12))."""
    counts = np.arange(2, 14)
    cfg = LeapConfig(mode="full", update_interval=1, memory_factor=0.5)
    g = torch.Generator().manual_seed(3)
    head = PartialFC(6, counts, HeadConfig(), cfg, single_process(), seed=1).train()
    for _ in range(6):
        head(torch.randn(8, 6, generator=g), torch.randint(0, 12, (8,), generator=g))
    one = head.state_dict()["leap"]
    assert one["class_std"].max() > 0 and one["count"].min() >= 0
    rows = ("centers", "seen", "count", "sum", "sumsq", "class_std", "memory_size")
    assert set(one) == set(rows) | {"memory"}
    ends = torch.cumsum(one["memory_size"], 0).tolist()
    starts = [0] + ends[:-1]
    parts = PartialFC.reshard([head.state_dict()], 3)
    for r, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):
        leap = parts[r]["leap"]
        assert set(leap) == set(one), r
        for key in rows:
            assert torch.equal(leap[key], one[key][lo:hi]), (r, key)
        assert torch.equal(leap["memory"], one["memory"][starts[lo]:ends[hi - 1]]), r
