"""Start a new run from someone's backbone weights (`model.init_from`): fine-tuning.

Three sources are accepted, all read with `torch.load(weights_only=True)` (a file a user is handed
never runs code):
- an InsightFace arcface_torch `.pth`: a plain state_dict (`backbone.module.state_dict()`; a
  leading `module.` on every key, as a DDP-wrapped save writes it, is removed);
- a facetrain export `backbone.pt` (`{"format": "facetrain-backbone", ..., "state_dict"}`);
- a facetrain checkpoint folder `ckpt_step{N}/` (its `replicated.pt`), or a run's `checkpoints/`
  folder (its newest complete checkpoint).
Only backbone weights are taken; the classifier of the new run starts fresh. Keys and shapes must
match the built backbone exactly, so a wrong architecture or image size is refused with the list
of what differs instead of loading half a model. With `allow_missing_final`, the backbone's final
embedding layer (`final_layer` prefixes, e.g. iresnet's fc + features) may be absent or shaped
differently (a new embedding size): it then keeps its fresh initialisation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from facetrain.config import ConfigError

_LIST_AT_MOST = 12


@dataclass(frozen=True)
class InitSource:
    """What was read: the file, its sha256, which kind of source, the tensors."""

    path: Path
    sha256: str
    kind: str                      # insightface | export | checkpoint
    state_dict: Dict[str, torch.Tensor]


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_file(folder: Path) -> Path:
    if (folder / "replicated.pt").is_file():
        return folder / "replicated.pt"
    from facetrain import checkpoint as ckpt   # a run's checkpoints/ root: its newest complete one
    roots = [folder, folder / "checkpoints"]
    for root in roots:
        if root.is_dir():
            latest = ckpt.find_latest(root)
            if latest is not None and (latest / "replicated.pt").is_file():
                return latest / "replicated.pt"
    raise ConfigError(f"model.init_from={folder} is a folder but neither a facetrain checkpoint "
                      "(ckpt_step<N>/ with replicated.pt) nor a run's checkpoints/ folder with a "
                      "complete checkpoint")


def read_init_source(path: Union[str, Path]) -> InitSource:
    """Load the backbone tensors named by `model.init_from`; ConfigError naming the file if it is
    missing, unreadable without running code, or not one of the three accepted kinds."""
    src = Path(path)
    if not src.exists():
        raise ConfigError(f"model.init_from={src} does not exist")
    file = _checkpoint_file(src) if src.is_dir() else src
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:   # pickle refusing a non-tensor object, a truncated zip, ...
        raise ConfigError(f"model.init_from: {file} cannot be read as plain tensors "
                          f"(torch.load weights_only=True): {exc}") from None
    digest = sha256_file(file)
    if isinstance(obj, dict) and obj.get("format") == "facetrain-backbone":
        from facetrain.export import ExportFormatError, check_exported
        try:
            state, kind = check_exported(obj, file)["state_dict"], "export"
        except ExportFormatError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    elif src.is_dir() or (isinstance(obj, dict) and "backbone" in obj and "step" in obj):
        state, kind = obj.get("backbone") if isinstance(obj, dict) else None, "checkpoint"
    else:
        state, kind = obj, "insightface"
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConfigError(f"model.init_from: {file} holds no backbone state_dict (expected a "
                          "mapping of parameter names to tensors, a facetrain backbone.pt or a "
                          "facetrain checkpoint)")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return InitSource(file, digest, kind, state)


def _shape(t: torch.Tensor) -> List[int]:
    return list(t.shape)


def _listing(label: str, items: Sequence[str]) -> str:
    more = f" (+{len(items) - _LIST_AT_MOST} more)" if len(items) > _LIST_AT_MOST else ""
    return f"{label} ({len(items)}): {', '.join(items[:_LIST_AT_MOST])}{more}"


def load_init_weights(backbone: nn.Module, source: InitSource, backbone_name: str,
                      allow_missing_final: bool = False) -> List[str]:
    """Copy `source`'s tensors into `backbone`; returns the keys left at their fresh values
    (only final-layer keys, and only with `allow_missing_final`).

    Raises ConfigError listing the missing keys, the unexpected keys and the shape mismatches
    (file shape vs model shape) when they are not all allowed."""
    model_sd = backbone.state_dict()
    final = tuple(f"{p}." for p in getattr(backbone, "final_layer", ()))
    is_final = (lambda k: allow_missing_final and k.startswith(final)) if final else \
        (lambda k: False)
    missing = [k for k in model_sd if k not in source.state_dict]
    unexpected = [k for k in source.state_dict if k not in model_sd]
    mismatched = [k for k in model_sd if k in source.state_dict
                  and tuple(source.state_dict[k].shape) != tuple(model_sd[k].shape)]
    bad_missing = [k for k in missing if not is_final(k)]
    bad_shape = [k for k in mismatched if not is_final(k)]
    bad_unexpected = [k for k in unexpected if not is_final(k)]
    if bad_missing or bad_shape or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(_listing("missing in the file", bad_missing))
        if bad_unexpected:
            parts.append(_listing("not in the backbone", bad_unexpected))
        if bad_shape:
            parts.append(_listing("shape differs (file vs backbone)", [
                f"{k} {_shape(source.state_dict[k])} vs {_shape(model_sd[k])}"
                for k in bad_shape]))
        hint = ("" if allow_missing_final or not final else
                f"; model.init_allow_missing_final=true accepts a missing or reshaped final "
                f"layer ({', '.join(p.rstrip('.') for p in final)})")
        raise ConfigError(f"model.init_from={source.path} does not match model.backbone="
                          f"{backbone_name} (check the backbone name, model.embedding_size and "
                          f"data.image_size): " + "; ".join(parts) + hint)
    skipped = sorted(set(missing) | set(mismatched))
    take = {k: v for k, v in source.state_dict.items() if k in model_sd and k not in mismatched}
    with torch.no_grad():
        for k, v in take.items():
            model_sd[k].copy_(v.to(model_sd[k].dtype))
    return skipped


def init_from_path(backbone: nn.Module, path: Union[str, Path], backbone_name: str,
                   allow_missing_final: bool = False, expect_sha256: str = ""
                   ) -> Tuple[InitSource, List[str]]:
    """read_init_source + load_init_weights, checking the file's sha256 when one is expected."""
    source = read_init_source(path)
    if expect_sha256 and expect_sha256.lower() != source.sha256:
        raise ConfigError(f"model.init_from={source.path} has sha256 {source.sha256}, not "
                          f"model.init_from_sha256={expect_sha256}")
    return source, load_init_weights(backbone, source, backbone_name, allow_missing_final)
