"""How the library's messages name its parameters, so that a program can show its own flags.

A message names a parameter of the library function that raised it in backquotes: `features`
(the parameter), `skip_bad=True` (pass it) or `multiple='skip'` (the value that led here). A
library caller reads that as Python. A program that exposes those parameters as options renders
them with `render_params` and its own table of flags, so its user reads --features, --skip-bad
and --multiple skip. The table belongs to the program: this module knows no flag.
"""
from __future__ import annotations

import ast
import re
import shlex
from typing import Mapping

PARAM = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]+))?`")


def render_params(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each backquoted parameter that `flags` maps (name -> option string) as
    that option: `name` and `name=True` -> the option alone (a switch), `name=value` -> the
    option and the value (a quoted string literal unquoted, shell-quoted if need be). Names
    `flags` does not map, and every other word, stay as they are."""
    def render(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        if value is None or value == "True":
            return flags[name]
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            literal = value
        shown = shlex.quote(literal) if isinstance(literal, str) else value
        return f"{flags[name]} {shown}"

    return PARAM.sub(render, message)
