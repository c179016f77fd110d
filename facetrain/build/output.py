"""Where a tool may write a new dataset folder: never onto its input, never over files silently.

Why: writing a subset into its own source folder replaced the source .rec/.idx/property, and an
existing output folder lost files without a word. A dataset folder written here holds the
dataset files of one prefix plus a few named extras; anything else in it is left alone.
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

from facetrain.build.writer import dataset_files
from facetrain.data import recordio as rio


class OutputError(ValueError):
    """An output location a tool refuses to write; the message names it and the way out."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def path_inside(folder: Path, entry: str, source: object, lineno: int) -> Path:
    """`folder / entry` for a name read from line `lineno` of file `source` that a tool writes
    output under; OutputError (naming file and line) when it would land outside `folder`.

    Why: list and metadata files come from elsewhere; an entry such as `../../x` or `/etc/x`
    would otherwise make the tool write wherever its author chose. Refused: an absolute path, a
    `..` component, and a path that leaves `folder` once symlinks already on disk are resolved
    (both sides resolved, so a symlinked output folder itself is fine)."""
    folder = Path(folder)
    rel = Path(entry)
    why = None
    if rel.is_absolute() or rel.anchor:
        why = "is an absolute path"
    elif ".." in rel.parts:
        why = "has a '..' component"
    else:
        target = (folder / rel).resolve()
        if not _inside(target, folder.resolve()):
            why = f"resolves to {target}, outside it (through a symbolic link)"
    if why is not None:
        raise OutputError(f"{source}:{lineno}: entry {entry!r} {why}; output written under this "
                          f"name must stay inside {folder}. Use a path relative to it without "
                          "'..'")
    return folder / rel


@dataclass
class OutputPlan:
    """What writing into an output folder will do: `replaced` files are overwritten (or removed,
    for an old dataset's extra shards); `kept` files are left exactly as they are."""
    folder: Path
    replaced: List[Path]
    kept: List[Path]

    def describe(self) -> str:
        """One line for the log: what writing over the folder replaces and what it leaves
        alone (it names no option: the caller chose to overwrite)."""
        msg = f"overwriting {self.folder}: replacing {_names(self.replaced) or 'no file'}"
        if self.kept:
            msg += (f"; keeping {_names(self.kept)} (not written by this tool; remove them "
                    "yourself if they belonged to the old dataset)")
        return msg


def check_output_folder(out: Path, inputs: Sequence[Path], overwrite: bool, prefix: str = "train",
                        extras: Iterable[str] = ()) -> OutputPlan:
    """Refuse an output folder equal to or inside an input's folder, or an existing non-empty
    one unless `overwrite`; say which existing files the new dataset will replace.

    `inputs`: the input's data files (their folders are protected). `extras`: other file names
    the tool writes beside the dataset (e.g. property, manifest.csv).
    """
    out = Path(out)
    out_r = out.resolve()
    if out_r.exists() and not out_r.is_dir():
        raise OutputError(f"output {out} is a file, not a folder; give a new folder")
    for folder in sorted({Path(p).resolve().parent for p in inputs}):
        if _inside(out_r, folder):
            where = "is" if out_r == folder else "is inside"
            raise OutputError(f"output folder {out} {where} the input dataset's folder {folder}; "
                              "writing there would replace or mix with the source "
                              ".rec/.idx/property: choose an output folder outside it")
    existing = sorted(out_r.iterdir()) if out_r.is_dir() else []
    mine = set(extras)
    ours = set(dataset_files(out_r / prefix))
    replaced = [p for p in existing if p.name in mine or p in ours]
    kept = [p for p in existing if p not in replaced]
    if existing and not overwrite:
        raise OutputError(f"output folder {out} already holds {len(existing)} file(s) "
                          f"({_names(existing)}); pass `overwrite=True` to replace its dataset "
                          "files (other files are kept), or choose a new or empty folder")
    return OutputPlan(out, replaced, kept)


def _names(paths: Sequence[Path], limit: int = 8) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


@contextmanager
def removed_if_failed(folder: Path) -> Iterator[None]:
    """A folder this block creates is removed again if the block fails and left it empty, so a
    failed run leaves no trace (a folder that existed before is never removed)."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            try:
                folder.rmdir()
            except OSError:     # not empty or already gone: leave it
                pass
        raise


def write_text_tmp(target: Path, rows: Iterable[Sequence[object]]) -> Path:
    """Write CSV rows to a hidden temporary file beside `target`; the caller renames it with
    os.replace once the dataset is in place (and unlinks it in a `finally`). Written before the
    dataset so a full disk fails before anything is committed."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with rio.writing_to(target, tmp):
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows(rows)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
