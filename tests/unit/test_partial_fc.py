"""PartialFC on one process: init, sampling, autocast, checkpoints and error messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facetrain.config import HeadConfig, LeapConfig, MarginConfig
from facetrain.dist import DistContext, single_process
from facetrain.heads.partial_fc import PartialFC, init_rows
from facetrain.heads.partition import class_range, partition_bounds
from facetrain.optim import SampledRowSGD

COUNTS = np.arange(1, 24)


def _ctx(rank, world):
    return DistContext(rank, world, rank, torch.device("cpu"), None, None)


def test_partition_is_contiguous_and_uneven():
    assert partition_bounds(10, 3) == [0, 4, 7, 10]
    assert class_range(10, 3, 2) == (7, 10)
    with pytest.raises(ValueError, match="at least one class"):
        partition_bounds(2, 3)


def test_init_does_not_depend_on_world_size():
    full = init_rows(0, 65540, 3, seed=7)
    torch.testing.assert_close(init_rows(65530, 65540, 3, seed=7), full[65530:])
    heads = [PartialFC(4, COUNTS, HeadConfig(), LeapConfig(mode="off"), _ctx(r, 3), seed=2) for r in range(3)]
    one = PartialFC(4, COUNTS, HeadConfig(), LeapConfig(mode="off"), single_process(), seed=2)
    torch.testing.assert_close(torch.cat([h.weight.detach() for h in heads]), one.weight.detach())


def test_sampling_keeps_every_positive_and_only_sampled_rows_get_gradient():
    counts = np.ones(200, dtype=np.int64) * 5
    head = PartialFC(8, counts, HeadConfig(0.1), LeapConfig(mode="off"), single_process(), seed=1).train()
    labels = torch.tensor([3, 3, 150, 199, 0, 77])
    loss = head(torch.randn(6, 8), labels)
    loss.backward()
    idx = head.last_sample_index
    assert idx.shape[0] == 20 and torch.isin(labels, idx).all()
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 20
    rows = head.weight.grad.abs().sum(1) > 0
    assert rows.sum() <= 20 and rows[labels].all() and not rows[~torch.isin(torch.arange(200), idx)].any()
    head.eval()                            # evaluation always uses every class
    torch.testing.assert_close(head(torch.randn(6, 8), labels).isfinite(), torch.tensor(True))


def test_update_rows_sampled_gives_the_same_gradient_as_a_sparse_tensor():
    counts = np.ones(200, dtype=np.int64) * 5
    emb, labels = torch.randn(6, 8), torch.tensor([3, 3, 150, 199, 0, 77])
    grads, rows = [], []
    for update_rows in ("all", "sampled"):
        head = PartialFC(8, counts, HeadConfig(0.1, update_rows=update_rows), LeapConfig(mode="full"),
                         single_process(), seed=1).train()
        head(emb, labels).backward()
        grads.append(head.weight.grad)
        rows.append(head.last_sample_index)
    dense, sparse = grads
    assert not dense.is_sparse and sparse.is_sparse
    assert torch.equal(rows[0], rows[1])
    # Exactly the k sampled rows, flagged coalesced (the optimizer needs no coalesce/host sync).
    assert sparse.is_coalesced() and torch.equal(sparse.indices()[0], rows[1])
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=0)


def test_a_head_with_sampled_row_updates_is_freed_with_its_last_reference():
    """The weight's post-accumulate hook must not hold the head: autograd keeps hooks from C++,
    out of the cycle collector's sight, so a strong reference there made the head (and its
    DistContext and process group) live until interpreter finalization, where gloo's threads
    abort the process."""
    import gc
    import weakref
    counts = np.ones(200, dtype=np.int64) * 5
    head = PartialFC(8, counts, HeadConfig(0.1, update_rows="sampled"), LeapConfig(mode="full"),
                     single_process(), seed=1).train()
    head(torch.randn(6, 8), torch.tensor([3, 3, 150, 199, 0, 77])).backward()
    assert head.weight.grad.is_coalesced()           # the hook ran
    alive = weakref.ref(head)
    del head
    gc.collect()
    assert alive() is None


def test_update_rows_sampled_accumulated_gradient_is_summed():
    counts = np.ones(200, dtype=np.int64) * 5
    head = PartialFC(8, counts, HeadConfig(0.1, update_rows="sampled"), LeapConfig(mode="off"),
                     single_process(), seed=1).train()
    ref = PartialFC(8, counts, HeadConfig(0.1), LeapConfig(mode="off"), single_process(), seed=1).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):                     # two micro-batches: their sampled rows overlap
        emb, labels = torch.randn(6, 8, generator=g), torch.randint(0, 200, (6,), generator=g)
        head(emb, labels).backward()
        ref(emb, labels).backward()
    grad = head.weight.grad
    rows = grad._indices()[0]
    if grad.is_coalesced():                # then it must really be: no repeated row
        assert rows.unique().numel() == rows.numel()
    torch.testing.assert_close(grad.to_dense(), ref.weight.grad)
    opt = SampledRowSGD([head.weight], lr=0.1, momentum=0.9, weight_decay=0.0)
    before = head.weight.detach().clone()
    opt.step()                             # the summed rows move by lr * summed gradient
    touched = ref.weight.grad.abs().sum(1) > 0
    torch.testing.assert_close(head.weight.detach()[touched],
                               before[touched] - 0.1 * ref.weight.grad[touched])
    assert torch.equal(head.weight.detach()[~touched], before[~touched])


def test_bf16_autocast_matmul_stays_close_to_fp32():
    head = PartialFC(16, COUNTS, HeadConfig(1.0, MarginConfig("arcface", 32.0, 0.0, 0.3)),
                     LeapConfig(mode="off"), single_process(), seed=0).train()
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(8, 16, generator=g), torch.randint(0, 23, (8,), generator=g)
    ref = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(emb, labels)
    assert low.dtype == torch.float32      # the softmax / CE stays fp32
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item())


def test_state_dict_roundtrip_and_reshard_1_to_3():
    cfg = LeapConfig(mode="vanilla", update_interval=1, head_threshold=10)
    one = PartialFC(4, COUNTS, HeadConfig(), cfg, single_process(), seed=3).train()
    for s in range(5):
        g = torch.Generator().manual_seed(s)
        one(torch.randn(20, 4, generator=g), torch.randint(0, 23, (20,), generator=g))
    state = one.state_dict()
    parts = PartialFC.reshard([state], 3)
    assert [(p["class_start"], p["class_end"]) for p in parts] == [(0, 8), (8, 16), (16, 23)]
    mean, var, valid = one.class_stats()
    for r, p in enumerate(parts):
        h = PartialFC(4, COUNTS, HeadConfig(), cfg, _ctx(r, 3), seed=99)
        h.load_state_dict([state], 3)          # resharded inside
        assert torch.equal(h.weight.detach(), p["weight"])
        for a, b in zip(h.class_stats(), (mean, var, valid)):
            torch.testing.assert_close(a, b[h.start:h.end])
        assert h.leap_summary()["pooled_var"] == one.leap_summary()["pooled_var"]
    back = PartialFC.reshard(parts, 1)[0]
    for k, v in state["leap"].items():
        torch.testing.assert_close(back["leap"][k], v, msg=k)
    torch.testing.assert_close(back["weight"], state["weight"])


def test_resume_on_same_world_size_continues_the_random_streams():
    cfg = LeapConfig(mode="full", update_interval=1)
    head = PartialFC(4, COUNTS, HeadConfig(0.5), cfg, single_process(), seed=3).train()
    emb, labels = torch.randn(20, 4), torch.randint(0, 23, (20,))
    head(emb, labels)
    state = head.state_dict()
    other = PartialFC(4, COUNTS, HeadConfig(0.5), cfg, single_process(), seed=8).train()
    other.load_state_dict([state], 1)
    torch.testing.assert_close(other(emb, labels), head(emb, labels))
    assert torch.equal(other.last_sample_index, head.last_sample_index)


def test_errors_name_the_problem_and_the_fix():
    head = PartialFC(4, COUNTS, HeadConfig(), LeapConfig(mode="off"), single_process())
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 4\]"):
        head(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64))
    parts = PartialFC.reshard([head.state_dict()], 2)
    with pytest.raises(ValueError, match="another world size"):
        head._load_own_state(parts[1])
    with pytest.raises(ValueError, match="world_size=2 but this head is one of 1"):
        head.load_state_dict(parts, 2)
    with pytest.raises(ValueError, match="block is missing"):
        PartialFC.reshard(parts[:1], 3)
    with pytest.raises(ValueError, match="no process group"):
        PartialFC(4, COUNTS, HeadConfig(), LeapConfig(mode="off"), _ctx(0, 2))(
            torch.randn(2, 4), torch.zeros(2, dtype=torch.int64))
    other = PartialFC(4, np.arange(1, 24) * 3, HeadConfig(), LeapConfig(mode="full"), single_process())
    with pytest.raises(ValueError, match="memory sizes differ"):
        other.load_state_dict([PartialFC(4, COUNTS, HeadConfig(), LeapConfig(mode="full"),
                                         single_process()).state_dict()], 1)


@pytest.mark.gpu
def test_cuda_head_matches_cpu():
    from facetrain.dist import single_process as sp
    emb, labels = torch.randn(32, 16), torch.randint(0, 23, (32,))
    out = {}
    for dev in ("cpu", "cuda"):
        head = PartialFC(16, COUNTS, HeadConfig(1.0, MarginConfig("combined", 32.0, 0.1, 0.3)),
                         LeapConfig(mode="off"), sp(torch.device(dev)), seed=4).train()
        e = emb.clone().to(dev).requires_grad_()
        loss = head(e, labels.to(dev))
        loss.backward()
        out[dev] = (loss.cpu(), e.grad.cpu(), head.weight.grad.cpu())
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    head = PartialFC(16, COUNTS, HeadConfig(0.5), LeapConfig(mode="full", update_interval=1),
                     sp(torch.device("cuda")), seed=4).train()
    for step in range(8):
        e = torch.randn(32, 16, device="cuda", requires_grad=True)
        labels = torch.randint(0, 23, (32,), device="cuda")
        if step >= 4:                      # after warm-up (and compiling): no host sync per step
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = head(e, labels)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
    assert head.leap_summary()["num_perturbed"] > 0


@pytest.mark.gpu
def test_cuda_sampled_row_updates_match_cpu_without_host_sync():
    """head.update_rows=sampled on CUDA: forward, sparse backward and SampledRowSGD's step run
    with no host sync after warm-up, and give the weights of a CPU run on the same rows."""
    from facetrain.dist import single_process as sp
    counts = np.ones(500, dtype=np.int64) * 5
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 500, (16,), generator=g))
               for _ in range(6)]
    rows, weights = [], {}
    for dev in ("cuda", "cpu"):
        head = PartialFC(8, counts, HeadConfig(0.1, update_rows="sampled"), LeapConfig(mode="off"),
                         sp(torch.device(dev)), seed=2).train()
        opt = SampledRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for step, (emb, labels) in enumerate(batches):
            if dev == "cpu":               # replay the CUDA run's sampled rows
                head._sample = lambda col, local, n, idx=rows[step]: idx
                head.last_sample_index = rows[step]
            if dev == "cuda" and step >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                head(emb.to(dev), labels.to(dev)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if dev == "cuda":
                rows.append(head.last_sample_index.cpu())
        weights[dev] = head.weight.detach().cpu()
    torch.testing.assert_close(weights["cpu"], weights["cuda"], rtol=1e-4, atol=1e-5)
