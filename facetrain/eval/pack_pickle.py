"""Reading a verification pack's pickle without running any code from it.

Packs (`lfw.bin`, `agedb_30.bin`, ...) are shared between teams and downloaded from the
internet; a plain `pickle.load` runs whatever callable a crafted file names. The format only
ever holds ``(bins, issame_list)``: bins a list of bytes (Python 2 `str`, read as bytes) or
1-D numpy uint8 arrays, issame a list of bools/ints (numpy bools too) or a numpy bool array. This
unpickler admits exactly the globals those need, and even for them builds the arrays itself
from the pickled bytes (numpy's own `__setstate__` never sees the file's state):

- `numpy.core.multiarray._reconstruct` + `numpy.ndarray` (how protocols 2-4 pickle an array),
  `numpy.core.numeric._frombuffer` (protocol 5), also under numpy 2's `numpy._core` names;
- `numpy.dtype` for 'u1' and 'b1' only, with the state numpy writes for them;
- `numpy.core.multiarray.scalar` for a numpy bool/uint8 scalar;
- `_codecs.encode(text, 'latin1')` (how Python 3 writes bytes at protocol 2).

Anything else is refused with the file's name and the global it asked for.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

_NAMES = {"u1": np.uint8, "b1": np.bool_}


class PackRefused(ValueError):
    """A pack whose pickle holds something a verification pack never does."""


class _Refuse(Exception):
    """Raised inside the unpickler; turned into PackRefused naming the file."""


def _text(v: Any) -> Any:
    return v.decode("latin1") if isinstance(v, (bytes, bytearray)) else v


class _DType:
    """What `numpy.dtype('u1' | 'b1', ...)` becomes while unpickling."""

    type: Any = None            # stays None when a crafted pickle skips __init__ (NEWOBJ)

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        name = _text(spec)
        if name not in _NAMES:
            raise _Refuse(f"numpy.dtype({spec!r}) (a pack holds uint8 'u1' and bool 'b1' only)")
        self.type = _NAMES[name]

    def __setstate__(self, state: Any) -> None:
        # numpy writes (3, '|', None, None, None, -1, -1, 0) for a one-byte type.
        ok = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
              and _text(state[1]) in ("|", "<", ">", "=") and state[2:5] == (None, None, None)
              and state[5:] == (-1, -1, 0))
        if not ok:
            raise _Refuse(f"numpy.dtype state {state!r} (not that of a plain uint8/bool)")


def _array(raw: Any, dtype: Any, shape: Any) -> np.ndarray:
    if not isinstance(dtype, _DType) or dtype.type is None:
        raise _Refuse(f"an array of dtype {type(dtype).__name__}")
    if not (isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int)):
        raise _Refuse(f"an array of shape {shape!r} (pack arrays are 1-D)")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != shape[0]:
        raise _Refuse(f"array data of {type(raw).__name__} that does not fill shape {shape}")
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    return data != 0 if dtype.type is np.bool_ else data.copy()


class _Array:
    """What `_reconstruct(ndarray, (0,), b'b')` becomes; BUILD hands it the array's state."""

    def __init__(self) -> None:
        self.value: Any = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and state[3] in (False, 0)):
            raise _Refuse("numpy array state that is not (1, shape, dtype, False, bytes)")
        self.value = _array(state[4], state[2], state[1])


_NDARRAY = object()          # `numpy.ndarray`: only meaningful as _reconstruct's first argument


def _reconstruct(subtype: Any, shape: Any, placeholder: Any) -> _Array:
    if subtype is not _NDARRAY or shape != (0,) or _text(placeholder) != "b":
        raise _Refuse("numpy.core.multiarray._reconstruct with arguments numpy never writes")
    return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if _text(order) not in ("C", "F"):
        raise _Refuse(f"numpy _frombuffer order {order!r}")
    return _array(buf, dtype, shape)


def _scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, _DType) or dtype.type is None \
            or not isinstance(data, (bytes, bytearray)) or len(data) != 1:
        raise _Refuse("numpy.core.multiarray.scalar of a type a pack does not hold")
    return bool(data[0]) if dtype.type is np.bool_ else int(data[0])


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refuse(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED: Dict[Tuple[str, str], Any] = {("_codecs", "encode"): _encode,
                                        ("numpy", "ndarray"): _NDARRAY,
                                        ("numpy", "dtype"): _DType}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class _PackUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refuse(f"the global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refuse(f"a persistent id {pid!r}")


def _finish(value: Any, what: str, check: Callable[[Any], bool]) -> Any:
    if isinstance(value, _Array):
        value = value.value
    if not check(value):
        shown = repr(value) if type(value) in (int, float, str) else type(value).__name__
        raise _Refuse(f"{what} {shown}")
    return value


def load_pack_pickle(path: Path) -> Tuple[List[Any], Any]:
    """(bins, issame) from pack `path`, read with the restricted unpickler (Python 2 packs:
    `str` read as bytes). PackRefused names the file and what it held that a pack never does;
    a file that is no pickle at all raises pickle.UnpicklingError/EOFError as before."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _PackUnpickler(io.BytesIO(data), encoding="bytes").load()
        if not isinstance(obj, (tuple, list)) or len(obj) != 2:
            raise _Refuse(f"a top-level {type(obj).__name__} (a pack is (bins, issame_list))")
        bins, issame = obj
        if not isinstance(bins, (list, tuple)):
            raise _Refuse(f"bins of type {type(bins).__name__} (a list of encoded images)")
        bins = [_finish(b, "an image entry",
                        lambda v: isinstance(v, bytes)
                        or (isinstance(v, np.ndarray) and v.dtype == np.uint8)) for b in bins]
        issame = _finish(issame, "issame_list",
                         lambda v: isinstance(v, (list, tuple)) or isinstance(v, np.ndarray))
        if not isinstance(issame, np.ndarray):
            issame = [_finish(s, "an issame entry",
                              lambda v: type(v) in (bool, int) and v in (0, 1)) for s in issame]
    except _Refuse as err:
        raise PackRefused(f"{path}: refused, not a verification pack: its pickle holds {err}; "
                          "a pack is (a list of encoded images as bytes or uint8 arrays, a "
                          "list of bools), and nothing else is read (it could run code)"
                          ) from None
    return bins, issame
