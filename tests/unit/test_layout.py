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


# A command-line flag in a string: "--word" at the start or after a space, quote, bracket or
# backquote (not a "---" rule, not a "a--b" name).
FLAG = r"(?:^|[\s\"'(`\[])--[a-z][a-z-]*"
# Strings that may hold flags: commands of other installable tools, which the library may name
# (a pip command that repairs an installed package; torchrun's own options). The repository's
# programs are never among them.
OTHER_TOOLS = ("pip install ", "torchrun ")


def runtime_strings(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every string constant of `path` that can reach a user at run time: all
    of them except docstrings and other bare string statements (f-string parts included)."""
    tree = ast.parse(path.read_text(), str(path))
    bare = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in bare:
            yield node.lineno, node.value


def test_library_messages_name_parameters_not_flags():
    """docs/architecture.md, "The library and the command lines": a library message names its
    own parameter (`skip_bad=True`, `features`) and the program renders it as its flag; the
    library holds none of the programs' flags (a pip install of facetrain ships no program)."""
    import re

    flag = re.compile(FLAG)
    bad = [f"{p.relative_to(REPO)}:{line}: {text!r}"
           for p in sorted((REPO / "facetrain").rglob("*.py"))
           for line, text in runtime_strings(p)
           if flag.search(text) and not any(t in text for t in OTHER_TOOLS)]
    assert bad == []


def test_the_library_defines_no_command_line_options():
    """The programs own their options (data_tools/_cli.add_align_options, eval_protocols/
    _common.add_common_args); the library neither imports argparse nor adds arguments."""
    bad = [str(p.relative_to(REPO)) for p, m in imports(REPO / "facetrain") if m == "argparse"]
    bad += [str(p.relative_to(REPO)) for p in sorted((REPO / "facetrain").rglob("*.py"))
            if ".add_argument(" in p.read_text()]
    assert bad == []
