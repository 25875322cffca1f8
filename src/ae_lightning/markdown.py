"""Text from a command line or a run folder, shown in Markdown as typed and never as markup.

Overrides and values reach ``summary.md`` and TensorBoard's Text tab (Python-Markdown with
tables, then sanitised): a ``|`` would split a table cell, ``<b>`` or ``**x**`` would format,
and a run of backticks would end a code block early. Every writer of those goes through here.
"""

from __future__ import annotations

import re
from typing import Any

# HTML entities for what Python-Markdown has no backslash escape for (an entity `|` never
# splits a table cell; `~~` is GitHub's strikethrough); backslashes for the inline markup.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "~": "&#126;"}
_BACKSLASHED = re.compile(r"([\\`*_\[\]#])")
_BACKTICK_RUN = re.compile(r"`+")


def escape(value: Any) -> str:
    """``a|b <i>*x*</i>`` -> text that renders as exactly those characters, on one line."""
    text = " ".join(str(value).splitlines())  # a newline would end the table row
    text = _BACKSLASHED.sub(r"\\\1", text)  # first: the entities below hold a `#`
    return "".join(_ENTITIES.get(char, char) for char in text)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; every cell escaped."""
    lines = ["| " + " | ".join(escape(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def code_block(text: str, language: str = "") -> str:
    """``text`` verbatim in a fenced block whose fence no backtick run inside can close."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"


_ESCAPED = re.compile(r"\\([\\`*_\[\]#])|&(amp|lt|gt|#124|#126);")
_UNENTITY = {"amp": "&", "lt": "<", "gt": ">", "#124": "|", "#126": "~"}


def unescape(text: str) -> str:
    """The inverse of ``escape``: a cell as typed (for a code block, which shows text raw)."""
    return _ESCAPED.sub(lambda m: m.group(1) or _UNENTITY[m.group(2)], text)
