"""Verification packs: reading, pair scores, 10-fold protocol, bad packs."""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc

from facetrain.eval import verification
from facetrain.eval.metrics import verification_kfold

from test_eval_builders import make_pack, subject_features


def test_load_pack_round_trip(tmp_path):
    issame = make_pack(tmp_path / "lfw.bin", 6, np.random.default_rng(0))
    bins, same = verification.load_pack(tmp_path / "lfw.bin")
    assert len(bins) == 12 and isinstance(bins[0], bytes)
    np.testing.assert_array_equal(same, issame)


def test_pack_errors_name_the_file(tmp_path):
    with open(tmp_path / "odd.bin", "wb") as fh:
        pickle.dump(([b"a", b"b", b"c"], [True, False]), fh)
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images but 2 pairs"):
        verification.load_pack(tmp_path / "odd.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable pickle"):
        verification.load_pack(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        verification.load_pack(tmp_path / "missing.bin")


def _py2_str(b: bytes) -> bytes:
    """A Python 2 `str` as its pickler writes it (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_uint8_array(b: bytes) -> bytes:
    """numpy.frombuffer(b, uint8) as Python 2's numpy pickles it (protocol 2)."""
    assert len(b) < 256
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
            + b"\x87R(K\x01K" + bytes([len(b)]) + b"\x85cnumpy\ndtype\n" + _py2_str(b"u1")
            + b"K\x00K\x01\x87R(K\x03" + _py2_str(b"|")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + _py2_str(b) + b"tb")


def _py2_pack(bins, issame, arrays: bool = False) -> bytes:
    """`pickle.dump((bins, issame), f, protocol=2)` as Python 2 wrote InsightFace's packs: bins
    are `str` (or numpy uint8 arrays), issame Python bools."""
    out = b"\x80\x02](" + b"".join(_py2_uint8_array(b) if arrays else _py2_str(b) for b in bins)
    out += b"e](" + b"".join(b"\x88" if x else b"\x89" for x in issame) + b"e\x86."
    return out


def test_packs_of_every_writer_load_alike(tmp_path):
    """Python 2 packs (str or numpy entries), Python 3 at protocol 2 (bytes via _codecs),
    4 (numpy entries and numpy bools) and 5 (numpy buffers, a bool array) give the same
    (bins, issame)."""
    rng = np.random.default_rng(3)
    bins = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5, 300, 17, 1)]
    issame = [True, False]
    arrays = [np.frombuffer(b, np.uint8) for b in bins]
    writers = {
        "py2_str": lambda f: f.write(_py2_pack(bins, issame)),
        "py2_numpy": lambda f: f.write(_py2_pack([b[:200] for b in bins], issame, arrays=True)),
        "py3_p2": lambda f: pickle.dump((bins, issame), f, protocol=2),
        "py3_p4_numpy": lambda f: pickle.dump(
            (arrays, [np.bool_(x) for x in issame]), f, protocol=4),
        "py3_p5_numpy": lambda f: pickle.dump((arrays, np.array(issame)), f, protocol=5),
    }
    for name, write in writers.items():
        with open(tmp_path / f"{name}.bin", "wb") as fh:
            write(fh)
        got_bins, got_same = verification.load_pack(tmp_path / f"{name}.bin")
        want = [b[:200] for b in bins] if name == "py2_numpy" else bins
        assert got_bins == want, name
        assert got_same.dtype == bool and got_same.tolist() == issame, name


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System:
    def __reduce__(self):
        return (os.system, ("touch system_ran",))


@pytest.mark.parametrize("case", ["open_in_bins", "system_in_issame", "object_array",
                                  "float_array", "tampered_dtype_state", "codecs_other"])
def test_a_crafted_pack_runs_nothing_and_is_refused(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload_ran"
    obj = {"open_in_bins": lambda: ([b"a", _Payload(marker)], [True]),
           "system_in_issame": lambda: ([b"a", b"b"], [_System()]),
           "object_array": lambda: ([np.array([b"a"], dtype=object), b"b"], [True]),
           "float_array": lambda: ([np.zeros(4), b"b"], [True]),
           }.get(case)
    path = tmp_path / f"{case}.bin"
    if obj is not None:
        with open(path, "wb") as fh:
            pickle.dump(obj(), fh, protocol=4)
    elif case == "tampered_dtype_state":   # the uint8 dtype's state with NPY_ITEM_REFCOUNT set
        data = _py2_pack([b"ab", b"cd"], [True], arrays=True)
        path.write_bytes(data.replace(b"K\x00tb\x89", b"K\x01tb\x89", 1))
    else:                                  # bytes through another codec than latin1
        path.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=2)
                         .replace(b"latin1", b"rot_13"))
    with pytest.raises(ValueError) as info:
        verification.load_pack(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: refused, not a verification pack: its pickle holds "), msg
    want = {"open_in_bins": "the global io.open", "system_in_issame": "the global posix.system",
            "object_array": "numpy.dtype('O8')", "float_array": "numpy.dtype('f8')",
            "tampered_dtype_state": "numpy.dtype state (3, b'|', None, None, None, -1, -1, 1)",
            "codecs_other": "_codecs.encode with encoding 'rot_13'"}[case]
    assert want in msg, msg
    assert not marker.exists() and not (tmp_path / "system_ran").exists()


def test_pack_images_name_the_bad_image(tmp_path):
    ds = verification.PackImages([b"x", b"y"], tmp_path / "lfw.bin")
    with pytest.raises(ValueError, match=r"lfw\.bin: image 1 \(pair 0\)"):
        ds[1]


def test_evaluate_against_reference():
    rng = np.random.default_rng(1)
    n = 300
    issame = rng.random(n) < 0.5
    subj = np.empty(2 * n, dtype=np.int64)
    subj[0::2] = np.arange(n)
    subj[1::2] = np.where(issame, np.arange(n), np.arange(n) + n)
    feats = subject_features(rng, subj, dim=8, noise=1.0) * rng.uniform(0.5, 3, (2 * n, 1))
    res = verification.evaluate_pack_features(feats.astype(np.float32), issame,
                                              fprs=(1e-3, 1e-1))
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = np.array([f[2 * i] @ f[2 * i + 1] for i in range(n)])
    ref = verification_kfold(cos, issame)
    assert res["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])
    assert 0.6 < res["accuracy_mean"] <= 1.0
    fpr, tpr, _ = sk_roc(issame, cos)
    assert res["tpr_at_fpr"]["1e-01"] == pytest.approx(tpr[fpr <= 1e-1].max())
    assert res["tpr_at_fpr"]["1e-03"] is None           # ~150 impostor pairs cannot resolve it
    with pytest.raises(ValueError, match="expected 600 rows"):
        verification.evaluate_pack_features(feats[:10], issame)
