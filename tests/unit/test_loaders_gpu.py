"""GPU paths (skipped without CUDA): DALI `mixed` decode and the torch loader deliver batches on
the GPU with the same contract and the same pixels as the CPU paths."""
import pytest
import torch

from facetrain.data import build_train_loader
from facetrain.dist import DistContext
from test_loaders import cfg, ids_of, rec  # noqa: F401  (rec: a fixture)


def gpu_ctx(rank=0, world=1):
    return DistContext(rank, world, 0, torch.device("cuda", 0), None, None)


def cpu_ctx():
    return DistContext(0, 1, 0, torch.device("cpu"), None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_gpu_contract_and_pixels(rec, kind):  # noqa: F811
    per_rank = []
    for r in range(3):
        ld = build_train_loader(cfg(rec, kind), gpu_ctx(r, 3), seed=1)
        batches = list(ld)
        assert len(batches) == len(ld) == 3
        for x, y in batches:
            assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
        per_rank += [i for x, y in batches for i in ids_of(x.cpu(), y.cpu())]
        ld.close()
    assert len(per_rank) == len(set(per_rank)) == 18
    gpu = build_train_loader(cfg(rec, kind, batch_size=23), gpu_ctx(), seed=0)
    cpu = build_train_loader(cfg(rec, kind, batch_size=23), cpu_ctx(), seed=0)
    (xg, yg), = list(gpu)
    (xc, yc), = list(cpu)
    og, oc = torch.argsort(yg.cpu() * 100 + xg[:, 1, 0, 0].cpu()), \
        torch.argsort(yc * 100 + xc[:, 1, 0, 0])
    torch.testing.assert_close(xg.cpu()[og], xc[oc], atol=2 / 127.5, rtol=0)
