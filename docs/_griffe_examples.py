"""A griffe extension for the API reference: `Example:` sections as examples, Sphinx roles as code.

modeldiff's docstrings head their doctests ``Example:`` (the doctest runner does not care).
griffe's Google-style parser knows only the plural ``Examples:`` as an examples section and would
render the singular one as an admonition of plain Markdown, where ``x[0][1]`` reads as a link
reference. Renaming the heading before the docstring is parsed gives the doctests code blocks.
Only a line that is exactly ``Example:`` (indented as a section heading) changes; prose headings
such as ``Example (runs for a minute)::`` followed by a literal block are left alone.

The docstrings also use Sphinx roles (``:func:`capture```, ``:class:`~modeldiff.diff.LatentDiff```),
which Markdown would show as written; they become inline code (``~`` keeps the last name only).
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    name = match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


class ReadableDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = _HEADING.sub(r"\1Examples:", doc.value) if "Example:" in doc.value else doc.value
        doc.value = _ROLE.sub(_code, value) if ":`" in value else value
