"""Turn the library's advice into command-line advice, and the options the aligning programs
share, for the programs in this folder.

The library (facetrain) names its own functions and parameters in its errors: "rebuild it with
facetrain.data.shards.rebuild_indexes('x.rec')", "`min_designs` must be >= 2", "pass
`skip_bad=True`", "align them first, e.g. facetrain.build.align_folder.align_folder". A user of
these programs needs the command to run and the flag to pass instead; `for_command_line` rewrites
exactly those forms (facetrain.advice for the parameters) and leaves every other word alone.
"""
from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from typing import TYPE_CHECKING, Optional

from facetrain.advice import render_params
from facetrain.data.recordio import REBUILD_CALL

if TYPE_CHECKING:     # the alignment modules load OpenCV: only the aligning programs import them
    from facetrain.build.align_folder import AlignSummary

_REBUILD = re.compile(re.escape(REBUILD_CALL) + r"\(('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\)")
# Library functions the messages name, and the program in this folder that runs each.
COMMANDS = {"facetrain.build.align_folder.align_folder": "`python data_tools/align_faces.py`",
            "facetrain.build.folders.folders_to_rec(size=...)":
                "`python data_tools/folders_to_rec.py --size`",
            "glyph_benchmark.build.build": "`python data_tools/build_glyphs.py`"}


def rebuild_command(rec: str) -> str:
    """The command that rebuilds the index of `rec` (shell-quoted)."""
    return f"`python data_tools/rebuild_index.py {shlex.quote(rec)}`"


def for_command_line(message: str, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """`message` with the library's rebuild call replaced by the rebuild_index.py command, the
    calls in COMMANDS by their programs and, given the program's `parser`, each backquoted
    parameter that is one of its options' destinations by that option (`tail_samples` ->
    --tail-samples, `skip_bad=True` -> --skip-bad, `multiple='skip'` -> --multiple skip);
    other backquoted names stay as they are."""
    text = _REBUILD.sub(lambda m: rebuild_command(ast.literal_eval(m.group(1))), message)
    for call, command in COMMANDS.items():
        text = text.replace(call, command)
    if parser is None:
        return text
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    return render_params(text, flags)


def add_align_options(p: argparse.ArgumentParser) -> None:
    """The alignment options every aligning program shares (align_faces, folders_to_rec,
    make_pack); their destinations are facetrain.build.align_folder's parameter names where one
    is named in its messages (`multiple`)."""
    from facetrain.build.align_folder import MULTIPLE
    p.add_argument("--landmarks", default=None, metavar="FILE",
                   help="landmarks file `name x1 y1 ... x5 y5 [score]`, names relative to the "
                        "image folder (default: detect faces with dlib)")
    p.add_argument("--multiple", choices=MULTIPLE, default="largest",
                   help="a photo with several faces: align the largest (default) or skip it")
    p.add_argument("--align-size", type=int, default=112, metavar="PX",
                   help="side of the aligned square (the template is scaled; default 112)")


def print_align_summary(tool: str, s: AlignSummary, parser: argparse.ArgumentParser) -> None:
    """An alignment's problem lines (stderr) and summary line (stdout), each problem's reason
    in the parser's flags (`multiple='skip'` -> --multiple skip)."""
    from facetrain.build.align_folder import summary_lines
    err, out = summary_lines(tool, s)
    for line in err:
        print(for_command_line(line, parser), file=sys.stderr)
    print(out)
