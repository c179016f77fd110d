"""Checkpoints that survive faults and world-size changes: assemble, verify, write, read.

Layout of `<output_dir>/checkpoints/`:
```
ckpt_step{N}/replicated.pt     rank 0: the engine's replicated state (backbone, its optimizer,
                               grad scaler), epoch, batch position, step, resolved config
ckpt_step{N}/rank{r:05d}.pt    rank r: the head's state (PartialFC.state_dict: classifier rows,
                               LEAP state, class range, sampling stream), the engine's per-rank
                               state (classifier optimizer, a ZeRO partition), RNG states
ckpt_step{N}/meta.json         world size, step, files with their sizes and CRC-32: written last,
                               marks a complete checkpoint
latest                         text file naming the newest complete checkpoint
```
Every file is read with `torch.load(weights_only=True)`: a checkpoint someone hands you runs no
code. So the saved state holds only tensors and plain Python values (dict, list, tuple, str, int,
float, bool, None); `check_pickle_free` enforces that before writing, and the one non-plain value
older checkpoints hold (numpy's RNG key, a uint32 array) is admitted on reading, nothing else.

A checkpoint is written under a temporary name and renamed when every rank's file is in it, so a
crash mid-write never leaves a half checkpoint behind `latest`. Files can still be damaged later
(a full disk, a truncated copy, bit rot): a resume verifies sizes and checksums first and falls
back to the newest intact checkpoint, naming the damaged file. The output folder must be on
storage every rank sees (the usual shared file system of a cluster).

Why a hand-made format rather than torch.distributed.checkpoint: the classifier is split in
contiguous, possibly uneven class blocks whose LEAP state (ring buffers sized by K_i) and optimizer
rows must move with their classes on a world-size change. That is a row concatenation and a
re-split (`PartialFC.reshard`, `PartialFC.load_optimizer_state`) that is easier to
read and test than expressing the blocks as DTensor placements.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import zlib
from pathlib import Path
from collections.abc import Sequence
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from facetrain.dist import DistContext

CKPT_PREFIX = "ckpt_step"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        # Every rank's file must be on disk before rank 0 publishes the checkpoint.
        dist.barrier(group=ctx.group)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    check_pickle_free(obj, path.name)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Exact types a checkpoint may hold: what `torch.load(weights_only=True)` rebuilds without
# running code. Exact (not isinstance): an IntEnum or a numpy scalar would pickle as a global.
_PLAIN = (str, bytes, int, float, bool, type(None), torch.dtype)


def check_pickle_free(obj: Any, where: str = "state") -> None:
    """CheckpointError naming the entry (e.g. `rank00000.pt["zero_optim"]["loss_scaler"]`) when
    `obj` holds anything but tensors and plain values: it could not be read back with
    weights_only=True, and a resume must never unpickle code."""
    if torch.is_tensor(obj):
        return
    kind = type(obj)
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            check_pickle_free(k, f"{where} key {k!r}")
            check_pickle_free(v, f"{where}[{k!r}]")
    elif kind in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_pickle_free(v, f"{where}[{i}]")
    elif kind not in _PLAIN:
        raise CheckpointError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}; a checkpoint holds only "
            "tensors and plain values (dict, list, tuple, str, int, float, bool, None) so that "
            "it loads with torch.load(weights_only=True); convert it before saving")


class _WriteFailed(Exception):
    """A write of `path` failed (carried to every rank as a message)."""


def _write_message(err: OSError, path: Path, root: Path) -> str:
    if err.errno == errno.ENOSPC:
        return (f"no space left writing {path}; the checkpoint was abandoned and its partial "
                f"files removed, the previous checkpoint under {root} is kept. Free space there "
                "(or lower checkpoint.keep_last, or move train.output_dir) and resume")
    return (f"could not write {path} ({err.strerror or err}); the checkpoint was abandoned and "
            f"its partial files removed, the previous checkpoint under {root} is kept")


def _write_own_files(tmp: Path, replicated: Optional[Dict[str, Any]], rank_part: Dict[str, Any],
                     ctx: DistContext, root: Path) -> Dict[str, Dict[str, int]]:
    """This rank's file (and rank 0's replicated.pt) with their digests; _WriteFailed says
    which write failed (a full disk). The partial files go with the temporary folder."""
    mine: Dict[str, Dict[str, int]] = {}
    names = [(f"rank{ctx.rank:05d}.pt", rank_part)]
    if ctx.is_main:
        if replicated is None:
            raise CheckpointError("rank 0 must pass the replicated checkpoint part")
        names.append(("replicated.pt", replicated))
    for name, obj in names:
        try:
            _atomic_torch_save(obj, tmp / name)
            mine[name] = file_digest(tmp / name)
        except OSError as err:
            raise _WriteFailed(_write_message(err, tmp / name, root)) from err
    return mine


def save_checkpoint(root: Path, step: int, replicated: Optional[Dict[str, Any]],
                    rank_part: Dict[str, Any], ctx: DistContext, keep_last: int) -> Path:
    """Write one checkpoint collectively (every rank calls this with its own `rank_part`, its rank file; rank 0 also
    passes `replicated`). Returns the final directory.

    A write that fails on any rank (a full disk: "no space left writing <path>") raises the same
    CheckpointError on every rank after the partial checkpoint is removed; the previous
    checkpoints and `latest` are untouched."""
    root = Path(root)
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".tmp_{CKPT_PREFIX}{step}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # left over from a crash during a write
        tmp.mkdir()
    _barrier(ctx)
    mine: Dict[str, Dict[str, int]] = {}
    failure: Optional[str] = None
    try:
        mine = _write_own_files(tmp, replicated, rank_part, ctx, root)
    except _WriteFailed as err:
        failure = str(err)
    digests = [(mine, failure)]
    if ctx.distributed:
        # Every rank hashes its own file (in parallel); rank 0 records them all. This also
        # waits until every rank's file is on disk, and tells every rank whether one failed.
        digests = [None] * ctx.world_size
        dist.all_gather_object(digests, (mine, failure), group=ctx.group)
    failure = next((f for _, f in digests if f), None)
    if failure is None and ctx.is_main:
        files = {k: v for d, _ in digests for k, v in d.items()}
        meta = {"step": step, "world_size": ctx.world_size,
                "files": ["replicated.pt"] + [f"rank{r:05d}.pt" for r in range(ctx.world_size)],
                "digests": files}
        try:
            _atomic_write_text(tmp / "meta.json", json.dumps(meta))
        except OSError as err:
            failure = _write_message(err, tmp / "meta.json", root)
        if failure is None:
            if final.exists():                      # the same step saved again after a restart
                shutil.rmtree(final)
            os.replace(tmp, final)
            try:
                _atomic_write_text(root / LATEST, final.name + "\n")
            except OSError as err:
                # `latest` still names the previous checkpoint: withdraw this one too, so the
                # outcome is the same as for any other failed write.
                (root / (LATEST + ".tmp")).unlink(missing_ok=True)
                shutil.rmtree(final, ignore_errors=True)
                failure = _write_message(err, root / LATEST, root)
            else:
                prune_checkpoints(root, keep_last)
    if ctx.distributed:
        box = [failure]
        # Rank 0's outcome (meta.json, `latest`) reaches every rank; this also waits for it.
        dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
        failure = box[0]
    if failure is not None:
        if ctx.is_main:        # every rank is past its writes: remove all partial files
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(failure)
    return final


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints (with meta.json) under `root`, oldest first."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "meta.json").is_file():
            try:
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    ckpts = list_checkpoints(root)
    for _, path in ckpts[:max(len(ckpts) - keep_last, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def file_digest(path: Path) -> Dict[str, int]:
    """{"bytes", "crc32"} of a file. CRC-32 (zlib, streamed) rather than a cryptographic hash:
    it detects truncation and corruption at disk speed on multi-GB classifier blocks."""
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 23)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return {"bytes": Path(path).stat().st_size, "crc32": crc}


def verify_checkpoint(path: Path) -> Optional[str]:
    """None when checkpoint `path` is intact, else what is wrong with it (naming the file).

    Checks meta.json parses, every file it lists exists, and (checkpoints written since sizes
    and checksums were recorded) each file's size and CRC-32 match."""
    path = Path(path)
    try:
        meta = read_meta(path)
        files = list(meta["files"])
        int(meta["world_size"]), int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path / 'meta.json'} is unreadable or damaged ({type(err).__name__}: {err})"
    digests = meta.get("digests", {})
    for name in files:
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        want = digests.get(name)
        if want is None:
            continue
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, {want['bytes']} were written (truncated or damaged)"
        if file_digest(f)["crc32"] != want["crc32"]:
            return f"{f} fails its CRC-32 check (its bytes changed after it was written)"
    return None


def _candidates(root: Path) -> List[Path]:
    """Checkpoints under `root`, newest first, the one `latest` names leading."""
    root = Path(root)
    found = [p for _, p in reversed(list_checkpoints(root))]
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if cand in found:
            found.remove(cand)
            found.insert(0, cand)
    return found


def find_latest(root: Path, damaged: Optional[List[str]] = None) -> Optional[Path]:
    """The newest INTACT checkpoint under `root` (the one `latest` names first), else None.

    Each damaged checkpoint passed over is appended to `damaged` as a sentence naming the file.
    Raises CheckpointError when checkpoints exist but none is intact: starting from scratch
    silently would throw away the run's work."""
    problems = [] if damaged is None else damaged
    candidates = _candidates(root)
    for cand in candidates:
        problem = verify_checkpoint(cand)
        if problem is None:
            return cand
        problems.append(problem)
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint under {root}: " + "; ".join(problems) + ". Restore the "
            "damaged files, or start fresh with checkpoint.resume=none (a new train.output_dir "
            "keeps these for inspection)")
    return None


def resolve_resume(resume: str, root: Path, damaged: Optional[List[str]] = None
                   ) -> Optional[Path]:
    """Map `checkpoint.resume` (auto | none | a path) to an intact checkpoint directory or None.

    `damaged` collects the damaged checkpoints that were skipped (for a warning)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root, damaged)
    path = Path(resume)
    if (path / "meta.json").exists():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.resume={resume!r}: {problem}; pick another "
                                  "checkpoint or use checkpoint.resume=none to start fresh")
        return path
    latest = find_latest(path, damaged)
    if latest is None:
        raise CheckpointError(f"checkpoint.resume={resume!r}: no complete checkpoint there "
                              f"(expected a {CKPT_PREFIX}N/ folder with meta.json, or a folder "
                              "holding them); use checkpoint.resume=none to start fresh")
    return latest


def read_meta(path: Path) -> Dict[str, Any]:
    with open(Path(path) / "meta.json", encoding="utf-8") as fh:
        return json.load(fh)


def _legacy_numpy_globals() -> List[Any]:
    """What rebuilds a numpy uint32 array (numpy's MT19937 key in checkpoints written before RNG
    states were stored as tensors) and nothing else: the only dtype class admitted is uint32's,
    so an object or float array is still refused."""
    core = getattr(np, "_core", None) or np.core
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:                        # numpy < 1.25: no per-dtype class to admit
        return []
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, dtypes.UInt32DType]


def _forbidden(err: BaseException) -> str:
    """The global or type torch's weights-only unpickler refused, from its message."""
    text = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"global {m.group(1)}"
    m = re.search(r"but got <class '([^']+)'>", text)
    if m:
        return f"an object of type {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return m.group(1).strip() if m else (text.splitlines() or [type(err).__name__])[0]


def load_file(f: Path, map_location: Any = "cpu") -> Any:
    """One checkpoint file read with `torch.load(weights_only=True)`: no code in it runs. A file
    holding any other pickled object (a crafted payload, an object an older writer put there)
    is refused with a CheckpointError naming the file and the object."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{f}: refused, it holds a pickled object that is not a tensor or plain value "
            f"({_forbidden(err)}); checkpoints are read without running code "
            "(torch.load weights_only=True). A file from elsewhere may be crafted: do not "
            "resume from it. (Checkpoints of train.engine=deepspeed written before facetrain "
            "stored DeepSpeed's state as plain values are refused the same way; resume them "
            "with the facetrain that wrote them, or start fresh with checkpoint.resume=none.)"
        ) from None


def load_replicated(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    return load_file(Path(path) / "replicated.pt", map_location)


def load_rank_file(path: Path, rank: int, map_location: Any = "cpu") -> Dict[str, Any]:
    """Rank `rank`'s own part of the checkpoint at `path` (rankNNNNN.pt: its classifier block,
    the engine's per-rank state)."""
    f = Path(path) / f"rank{rank:05d}.pt"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {f.name}; it is incomplete or corrupt: "
                              "delete it (the previous one is used) or set checkpoint.resume")
    return load_file(f, map_location)


class SavedStates(Sequence):
    """One part of every saved rank's state, `part(rank r's file)` for r in range(saved world
    size), each file read on first access and kept. What the head's and the engines'
    `load_state_dict(states, world_size)` take: on the same world size a rank reads only its
    own file unless its part needs every rank's (ZeRO partitions)."""

    def __init__(self, path: Path, part: Callable[[Dict[str, Any]], Any],
                 files: Optional[Dict[int, Dict[str, Any]]] = None,
                 map_location: Any = "cpu") -> None:
        self.path, self.part, self.map_location = Path(path), part, map_location
        self.world_size = int(read_meta(path)["world_size"])
        self._files = {} if files is None else files

    def view(self, part: Callable[[Dict[str, Any]], Any]) -> "SavedStates":
        """Another part of the same files (read once for both)."""
        return SavedStates(self.path, part, self._files, self.map_location)

    def __len__(self) -> int:
        return self.world_size

    def __getitem__(self, rank):  # type: ignore[override]
        if isinstance(rank, slice):
            return [self[r] for r in range(self.world_size)[rank]]
        if not 0 <= rank < self.world_size:
            raise IndexError(f"checkpoint {self.path} was saved by {self.world_size} ranks; "
                             f"there is no rank {rank}")
        if rank not in self._files:
            self._files[rank] = load_rank_file(self.path, rank, self.map_location)
        return self.part(self._files[rank])


def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every random stream this process draws from (restored on resume for equal losses), as
    tensors and plain values: numpy's uint32 key goes into an int64 tensor (no numpy pickle)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`'s streams; also the numpy tuple of checkpoints written before."""
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["gauss"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
