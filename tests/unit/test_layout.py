"""The package layout's one-way arrows, read from the source: the library imports none of its
clients, reading never imports writing, and no program edits sys.path (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ("glyph_benchmark", "experiments", "data_tools", "eval_protocols", "launch",
           "benchmarks", "tests", "_cli", "_common", "_interrupt")


def imports(folder: Path) -> Iterator[Tuple[Path, str]]:
    """(file, imported module) of every import statement under `folder`, at any depth."""
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((path, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield path, node.module


def test_the_library_imports_none_of_its_clients():
    bad = [(str(p.relative_to(REPO)), m) for p, m in imports(REPO / "facetrain")
           if m.split(".")[0] in CLIENTS]
    assert bad == []


def test_reading_data_never_imports_dataset_building():
    bad = [(str(p.relative_to(REPO)), m) for p, m in imports(REPO / "facetrain" / "data")
           if m == "facetrain.build" or m.startswith("facetrain.build.")]
    assert bad == []


def test_no_program_edits_sys_path():
    """The scripts import the installed packages (scripts/setup.sh's pip install -e) and their
    folder's helpers as siblings; only tests may put their own helper folders on the path."""
    folders = ("facetrain", "glyph_benchmark", "experiments", "data_tools", "eval_protocols",
               "launch", "benchmarks")
    bad = [str(p.relative_to(REPO)) for f in folders for p in sorted((REPO / f).rglob("*.py"))
           if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert bad == []


def test_a_shard_is_a_dataset_file_not_a_class_block():
    """docs/architecture.md, "Names with one meaning": the classifier, its engines and the
    trainer speak of a rank's class *block* and *rank file*; the noun "shard" is left to dataset
    files (the checkpoint key "shard" is a file format name, quoted). Verbs (sharded,
    reshard) keep their sense."""
    import re

    noun = re.compile(r"(?<![\"'\w])shards?(?![\"'\w])", re.IGNORECASE)
    files = [*sorted((REPO / "facetrain" / "heads").rglob("*.py")),
             *sorted((REPO / "facetrain" / "engines").rglob("*.py")),
             *(REPO / "facetrain" / f for f in ("trainer.py", "plan.py", "optim.py",
                                                 "checkpoint.py", "dist.py"))]
    bad = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) if noun.search(line)]
    assert bad == []
