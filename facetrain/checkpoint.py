"""Checkpoints that survive faults and world-size changes, and the backbone export.

Layout of `<output_dir>/checkpoints/`:
```
ckpt_step{N}/replicated.pt     rank 0: backbone, backbone optimizer (replicated part), scheduler,
                               grad scaler, epoch, batch position, step, resolved config
ckpt_step{N}/rank{r:05d}.pt    rank r: classifier shard (weights + LEAP state), its optimizer
                               state, its class range, its RNG states (and a ZeRO partition)
ckpt_step{N}/meta.json         world size, step, files with their sizes and CRC-32: written last,
                               marks a complete checkpoint
latest                         text file naming the newest complete checkpoint
```
A checkpoint is written under a temporary name and renamed when every rank's file is in it, so a
crash mid-write never leaves a half checkpoint behind `latest`. Files can still be damaged later
(a full disk, a truncated copy, bit rot): a resume verifies sizes and checksums first and falls
back to the newest intact checkpoint, naming the damaged file. The output folder must be on
storage every rank sees (the usual shared file system of a cluster).

Why a hand-made format rather than torch.distributed.checkpoint: the classifier is split in
contiguous, possibly uneven class blocks whose LEAP state (ring buffers sized by K_i) and optimizer
rows must move with their classes on a world-size change. That is a row concatenation and a
re-split (`PartialFC.reshard`, `reshard_optimizer_state`) that is easier to read and test than
expressing the blocks as DTensor placements.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from facetrain.dist import DistContext

CKPT_PREFIX = "ckpt_step"
LATEST = "latest"
EXPORT_FORMAT = "facetrain-backbone"
EXPORT_VERSION = 1


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, replicated: Optional[Dict[str, Any]],
                    shard: Dict[str, Any], ctx: DistContext, keep_last: int) -> Path:
    """Write one checkpoint collectively (every rank calls this with its own `shard`; rank 0 also
    passes `replicated`). Returns the final directory."""
    root = Path(root)
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".tmp_{CKPT_PREFIX}{step}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # left over from a crash during a write
        tmp.mkdir()
    _barrier(ctx)
    mine = {}
    name = f"rank{ctx.rank:05d}.pt"
    _atomic_torch_save(shard, tmp / name)
    mine[name] = file_digest(tmp / name)
    if ctx.is_main:
        if replicated is None:
            raise CheckpointError("rank 0 must pass the replicated checkpoint part")
        _atomic_torch_save(replicated, tmp / "replicated.pt")
        mine["replicated.pt"] = file_digest(tmp / "replicated.pt")
    digests = [mine]
    if ctx.distributed:
        # Every rank hashes its own file (in parallel); rank 0 records them all. This also
        # waits until every rank's file is on disk.
        digests = [None] * ctx.world_size
        dist.all_gather_object(digests, mine, group=ctx.group)
    if ctx.is_main:
        files = {k: v for d in digests for k, v in d.items()}
        meta = {"step": step, "world_size": ctx.world_size,
                "files": ["replicated.pt"] + [f"rank{r:05d}.pt" for r in range(ctx.world_size)],
                "digests": files}
        _atomic_write_text(tmp / "meta.json", json.dumps(meta))
        if final.exists():                      # the same step saved again after a restart
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name + "\n")
        prune_checkpoints(root, keep_last)
    _barrier(ctx)
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
    it detects truncation and corruption at disk speed on multi-GB classifier shards."""
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


def load_replicated(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    return torch.load(Path(path) / "replicated.pt", map_location=map_location, weights_only=False)


def load_shard(path: Path, rank: int, map_location: Any = "cpu") -> Dict[str, Any]:
    f = Path(path) / f"rank{rank:05d}.pt"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {f.name}; it is incomplete or corrupt: "
                              "delete it (the previous one is used) or set checkpoint.resume")
    return torch.load(f, map_location=map_location, weights_only=False)


def load_all_shards(path: Path, map_location: Any = "cpu") -> List[Dict[str, Any]]:
    """Every rank's file of a checkpoint (for resharding to another world size)."""
    return [load_shard(path, r, map_location) for r in range(read_meta(path)["world_size"])]


def reshard_optimizer_state(shards: Sequence[Dict[str, Any]], new_range: Tuple[int, int]
                            ) -> Dict[str, Any]:
    """Re-split the classifier shards' optimizer states for the class block `new_range`.

    Each shard holds `head_optim` (a torch optimizer state_dict), `head_param_rows` (dim-0 size
    of each head parameter) and `class_range` (start, end). A state tensor whose dim 0 equals its
    parameter's class count is a per-class row block (SGD momentum, Adam moments): the blocks
    are concatenated in class order and sliced, so each momentum row moves with its class.
    Anything else (Adam's step counter) is taken from shard 0.
    """
    shards = sorted(shards, key=lambda s: s["class_range"][0])
    start, end = new_range
    base = shards[0]["head_optim"]
    out_state: Dict[int, Dict[str, Any]] = {}
    for idx in range(len(shards[0]["head_param_rows"])):
        names = set()
        for s in shards:
            names.update(s["head_optim"]["state"].get(idx, {}).keys())
        entry: Dict[str, Any] = {}
        for name in sorted(names):
            parts, row_sharded = [], True
            for s in shards:
                rows = s["head_param_rows"][idx]
                val = s["head_optim"]["state"].get(idx, {}).get(name)
                if not (torch.is_tensor(val) and val.dim() >= 1 and val.shape[0] == rows
                        and rows == s["class_range"][1] - s["class_range"][0]):
                    row_sharded = False
                    break
                parts.append(val)
            if row_sharded:
                entry[name] = torch.cat(parts, 0)[start:end].clone()
            else:
                entry[name] = base["state"].get(idx, {}).get(name)
        if entry:
            out_state[idx] = entry
    return {"state": out_state, "param_groups": base["param_groups"]}


def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every random stream this process draws from (restored on resume for equal losses)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def export_backbone(backbone: torch.nn.Module, name: str, kwargs: Dict[str, Any],
                    out_dir: Path, image_size: Union[int, Sequence[int]],
                    onnx: bool = True) -> Dict[str, Path]:
    """Write `backbone.pt` ({format, version, backbone, kwargs, state_dict}, loadable by
    `facetrain.models.registry.build_backbone(name, **kwargs)`) and `backbone.onnx`.

    The ONNX graph takes float images [N, 3, H, W] in [-1, 1] and returns embeddings [N, D]
    (not normalised), with a dynamic batch dimension. Call on rank 0 only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # float32 whatever the training precision (DeepSpeed bf16/fp16 casts the module itself).
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in backbone.state_dict().items()}
    payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "backbone": name,
               "kwargs": dict(kwargs), "state_dict": state}
    paths = {"torch": out_dir / "backbone.pt"}
    _atomic_torch_save(payload, paths["torch"])
    if onnx:
        paths["onnx"] = out_dir / "backbone.onnx"
        export_onnx(backbone, paths["onnx"], image_size)
    return paths


def export_onnx(backbone: torch.nn.Module, path: Path,
                image_size: Union[int, Sequence[int]]) -> None:
    """ONNX via the TorchScript-based exporter: the dynamo exporter needs onnxscript, which is
    not a dependency; the traced graph of a plain CNN is the same."""
    import copy

    model = copy.deepcopy(backbone).float().cpu().eval()
    model = model.to(memory_format=torch.contiguous_format)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    dummy = torch.zeros(2, 3, h, w)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["embeddings"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    os.replace(tmp, path)


def load_exported(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read and check an exported backbone file (the eval side builds the module from it)."""
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a {EXPORT_FORMAT} file (no 'format' key); export "
                              "one with facetrain.checkpoint.export_backbone")
    if payload.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{path}: export version {payload.get('version')!r} is not "
                              f"{EXPORT_VERSION}; re-export with this facetrain version")
    return payload
