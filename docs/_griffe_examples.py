"""A griffe extension for the API reference: read ``Example:`` docstring sections as examples.

modeldiff's docstrings head their doctests ``Example:`` (the doctest runner does not care).
griffe's Google-style parser knows only the plural ``Examples:`` as an examples section and would
render the singular one as an admonition of plain Markdown, where ``x[0][1]`` reads as a link
reference. Renaming the heading before the docstring is parsed gives the doctests code blocks.
Only a line that is exactly ``Example:`` (indented as a section heading) changes; prose headings
such as ``Example (runs for a minute)::`` followed by a literal block are left alone.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is not None and "Example:" in doc.value:
            doc.value = _HEADING.sub(r"\1Examples:", doc.value)
