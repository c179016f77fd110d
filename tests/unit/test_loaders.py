"""Loader contract, torch and DALI (CPU): shapes, range, RGB, flip, resize, equal per-rank batch
counts with uneven totals, disjoint rank shards, epoch reshuffle, iter_from, bad images."""
import cv2
import numpy as np
import pytest
import torch

from facetrain.build.writer import write_insightface_dataset
from facetrain.config import DataConfig
from facetrain.data import build_train_loader
from facetrain.data.errors import DatasetError
from facetrain.dist import DistContext

COUNTS = [5, 4, 4, 3, 3, 2, 2]          # 23 images: uneven over 3 ranks x batch 2


def colour_image(label: int, i: int, size: int, fmt: str = ".png") -> bytes:
    """Left half BGR (20*label, 10*i, 40), right half white; PNG is decoded exactly."""
    img = np.full((size, size, 3), 255, np.uint8)
    img[:, : size // 2] = (20 * label, 10 * i, 40)
    return cv2.imencode(fmt, img)[1].tobytes()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("loaders")
    items = [(c, colour_image(c, i, 16)) for c, n in enumerate(COUNTS) for i in range(n)]
    write_insightface_dataset(d / "train", items, len(COUNTS), 16)
    return str(d / "train")


def ctx(rank=0, world=1):
    return DistContext(rank, world, 0, torch.device("cpu"), None, None)


def cfg(rec, loader, **kw):
    base = dict(rec=rec, loader=loader, batch_size=2, num_workers=0, image_size=16,
                random_flip=False)
    base.update(kw)
    return DataConfig(**base)


def ids_of(images, labels, flipped_ok=False):
    """(label, i) decoded from the pixels; also checks RGB order and the label."""
    x = (images + 1) * 127.5
    out = []
    for img, lab in zip(x, labels.tolist()):
        left, right = img[:, 8, 0], img[:, 8, 15]
        if flipped_ok and left.min() > 250:                  # mirrored image
            left, right = right, left
        assert right.min() > 250, "right half must be white"
        r, g, b = (float(v) for v in left)
        assert abs(r - 40) < 2 and abs(b - 20 * lab) < 2, (r, g, b, lab)   # RGB order, label
        out.append((lab, round(g / 10)))
    return out


def collect(loader, it=None):
    batches = list(loader if it is None else it)
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16)
        assert y.dtype == torch.int64 and y.shape == (2,)
        assert x.min() >= -1 and x.max() <= 1
    return batches


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_contract_ranks_epochs_resume(rec, kind):
    per_rank = []
    for r in range(3):
        ld = build_train_loader(cfg(rec, kind), ctx(r, 3), seed=1)
        assert len(ld) == 3 and ld.num_classes == 7 and ld.class_counts.tolist() == COUNTS
        batches = collect(ld)
        assert len(batches) == len(ld)
        per_rank.append([i for x, y in batches for i in ids_of(x, y)])
        if r == 0:
            ld.set_epoch(1)
            other = [i for x, y in collect(ld) for i in ids_of(x, y)]
            assert other != per_rank[0]
            ld.set_epoch(0)
            resumed = [i for x, y in collect(ld, ld.iter_from(1)) for i in ids_of(x, y)]
            if kind == "torch":
                assert resumed == per_rank[0][2:]             # exact order
            else:                                             # DALI: the remaining set
                assert sorted(resumed) == sorted(per_rank[0][2:])
            assert list(ld.iter_from(3)) == []
        ld.close()
    everything = [i for p in per_rank for i in p]
    assert len(everything) == len(set(everything)) == 18       # disjoint rank shards


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_flip_and_resize(tmp_path, kind):
    items = [(c, colour_image(c, i, 24)) for c in range(2) for i in range(8)]
    write_insightface_dataset(tmp_path / "train", items, 2, 24)
    ld = build_train_loader(cfg(str(tmp_path / "train"), kind, batch_size=16, random_flip=True),
                            ctx(), seed=0)
    (x, y), = list(ld)
    assert x.shape == (16, 3, 16, 16)
    flipped = int(((x[:, :, :, 0] + 1) * 127.5 > 250).all(dim=(1, 2)).sum())
    assert 1 <= flipped <= 15
    ids = ids_of(x, y, flipped_ok=True)
    assert sorted(ids) == sorted((c, i) for c in range(2) for i in range(8))


def test_dali_matches_torch_pixels(tmp_path):
    items = [(c, cv2.imencode(".jpg", np.random.default_rng(c).integers(0, 255, (32, 32, 3))
                              .astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
             for c in range(8)]
    write_insightface_dataset(tmp_path / "train", items, 8, 32)
    out = {}
    for kind in ("torch", "dali"):
        ld = build_train_loader(cfg(str(tmp_path / "train"), kind, batch_size=8,
                                    image_size=32), ctx(), seed=0)
        (x, y), = list(ld)
        out[kind] = x[torch.argsort(y)]
    diff = (out["torch"] - out["dali"]).abs() * 127.5
    assert diff.mean() < 1.5 and diff.max() < 40      # libjpeg-turbo vs DALI's decoder


def bad_dataset(tmp_path):
    items = [(0, colour_image(0, i, 16)) for i in range(3)] + [(1, b"not an image")] + \
        [(1, colour_image(1, i, 16)) for i in range(2)]
    write_insightface_dataset(tmp_path / "train", items, 2, 16)
    return str(tmp_path / "train")


def test_undecodable_image_torch(tmp_path):
    rec = bad_dataset(tmp_path)
    ld = build_train_loader(cfg(rec, "torch", batch_size=6), ctx(), seed=0)
    with pytest.raises(DatasetError, match=r"train\.rec: record key 4 at byte \d+: image bytes .*"
                                           r"skip_bad_images=true"):
        list(ld)
    ld = build_train_loader(cfg(rec, "torch", batch_size=6, skip_bad_images=True,
                                num_workers=2), ctx(), seed=0)
    (x, y), = list(ld)
    assert ld.skipped == 1 and x.shape[0] == 6 and len(set(ids_of(x, y))) == 5


def test_undecodable_image_dali(tmp_path):
    rec = bad_dataset(tmp_path)
    ld = build_train_loader(cfg(rec, "dali", batch_size=6), ctx(), seed=0)
    with pytest.raises(DatasetError,
                       match=r"train\.rec: record key 4 at byte \d+: image bytes \(12\) cannot"):
        list(ld)
    with pytest.raises(ValueError, match="torch loader"):
        build_train_loader(cfg(rec, "dali", skip_bad_images=True), ctx(), seed=0)


def test_too_small_for_batch(rec):
    with pytest.raises(ValueError, match=r"batch_size=16 x 2 ranks needs at least 32 images"):
        build_train_loader(cfg(rec, "torch", batch_size=16), ctx(0, 2), seed=0)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_sharded_dataset(tmp_path, kind):
    items = [(c, colour_image(c, i, 16)) for c, n in enumerate(COUNTS) for i in range(n)]
    write_insightface_dataset(tmp_path / "train", items, len(COUNTS), 16, shard_size=4)
    ld = build_train_loader(cfg(str(tmp_path), kind, batch_size=1), ctx(), seed=0)
    assert len(ld.dataset.shards) == 6 and len(ld) == 23
    got = sorted(i for x, y in ld for i in ids_of(x, y))
    assert got == sorted((c, i) for c, n in enumerate(COUNTS) for i in range(n))


def test_image_only_index_for_plain_dali(tmp_path):
    from facetrain.data.dali_loader import write_image_only_index
    from facetrain.data.dataset import RecordDataset

    items = [(c, colour_image(c, 0, 16)) for c in range(5)]
    write_insightface_dataset(tmp_path / "train", items, 5, 16, shard_size=2)
    ds = RecordDataset.open(str(tmp_path))
    path = write_image_only_index(ds)
    assert path == tmp_path / "train_000.images.idx"
    lines = [tuple(map(int, ln.split("\t"))) for ln in path.read_text().splitlines()]
    concat = b"".join(s.rec.read_bytes() for s in ds.shards)
    assert [k for k, _ in lines] == list(range(5))          # images only, no header/identity
    for k, off in lines:                                     # global offsets, DALI's convention
        assert concat[off:off + 4] == b"\x0a\x23\xd7\xce"
        assert concat[off + 8 + 4:off + 8 + 8] == np.float32(k).tobytes()


def test_non_square_input_size(rec):
    """Re-ID shapes: data.image_size x data.image_width (H x W), from either loader."""
    for kind in ("torch", "dali"):
        ld = build_train_loader(cfg(rec, kind, image_size=32, image_width=16), ctx(), seed=0)
        x, y = next(iter(ld))
        assert tuple(x.shape[1:]) == (3, 32, 16), kind
        assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize("repeat", [0.0, 0.3])
def test_persistent_workers_keep_every_epochs_order(rec, repeat):
    """One torch loader with 2 workers kept across epochs (partial epochs and a resume in the
    middle) yields, per epoch, exactly the pixels and labels of a fresh loader per epoch, which
    is how every epoch was loaded before workers persisted (the fresh one decodes in-process:
    workers never chose the order). Repeat-factor resampling and flips on; the workers stay the
    same processes from epoch to epoch."""
    kw = dict(num_workers=2, random_flip=True, repeat_factor_threshold=repeat)
    ld = build_train_loader(cfg(rec, "torch", **kw), ctx(1, 2), seed=3)
    pids = []
    try:
        for epoch, start, take in ((0, 0, None), (1, 0, 2), (2, 1, None), (3, 0, None)):
            ld.set_epoch(epoch)
            got = []
            for k, b in enumerate(ld.iter_from(start)):
                got.append(b)
                pids.append(sorted(w.pid for w in ld._loader._iterator._workers))
                if take is not None and k + 1 == take:      # the trainer leaves epochs early
                    break
            fresh = build_train_loader(cfg(rec, "torch", **{**kw, "num_workers": 0}), ctx(1, 2),
                                       seed=3)
            fresh.set_epoch(epoch)
            want = list(fresh.iter_from(start))[:take]
            fresh.close()
            assert len(got) == len(want) > 0, epoch
            for (x, y), (wx, wy) in zip(got, want):
                assert torch.equal(x, wx) and torch.equal(y, wy), epoch
        assert len({tuple(p) for p in pids}) == 1           # no new worker processes
        if repeat:
            ld.release_workers()
            ld.set_epoch(0)
            assert len(list(ld)) == len(ld)                 # started again after a release
    finally:
        ld.close()
