"""Turn the library's advice into command-line advice, for the programs in this folder.

The library (facetrain) names its own functions and options in its errors: "rebuild it with
facetrain.data.shards.rebuild_indexes('x.rec')", "`min_designs` must be >= 2", "align them first,
e.g. facetrain.build.align_folder.align_folder". A user of these programs needs the command to
run and the flag to pass instead; `for_command_line` rewrites exactly those forms and leaves
every other word of the message alone.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from typing import Optional

from facetrain.data.recordio import REBUILD_CALL

_REBUILD = re.compile(re.escape(REBUILD_CALL) + r"\(('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\)")
_OPTION = re.compile(r"`([a-z][a-z0-9_]*)`")
# Library functions the messages name, and the program in this folder that runs each.
COMMANDS = {"facetrain.build.align_folder.align_folder": "`python data_tools/align_faces.py`",
            "glyph_benchmark.build.build": "`python data_tools/build_glyphs.py`"}


def rebuild_command(rec: str) -> str:
    """The command that rebuilds the index of `rec` (shell-quoted)."""
    return f"`python data_tools/rebuild_index.py {shlex.quote(rec)}`"


def for_command_line(message: str, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """`message` with the library's rebuild call replaced by the rebuild_index.py command, the
    calls in COMMANDS by their programs and, given the program's `parser`, each `name` in
    backquotes that is one of its options by that option's flag (`tail_samples` ->
    --tail-samples); other backquoted names stay as they are."""
    text = _REBUILD.sub(lambda m: rebuild_command(ast.literal_eval(m.group(1))), message)
    for call, command in COMMANDS.items():
        text = text.replace(call, command)
    if parser is None:
        return text
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    return _OPTION.sub(lambda m: flags.get(m.group(1), m.group(0)), text)
