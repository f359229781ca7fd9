"""A Griffe extension for the API reference (mkdocs.yml loads it; it is not part of the site).

capsspec's docstrings are plain text, where `known_gaps/<backend>.txt` or `checks.<check>` names a
placeholder; rendered as Markdown, `<backend>` would be taken for an HTML tag and vanish. This
escapes such placeholders outside code spans and indented code blocks, so the page shows them.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_PLACEHOLDER = re.compile(r"<([A-Za-z_][\w .-]*)>")


def escape_placeholders(text: str) -> str:
    """`text` with every <placeholder> outside code written as &lt;placeholder&gt;."""
    lines = []
    for line in text.splitlines():
        if line.startswith("    "):  # an indented code block shows its text as it is
            lines.append(line)
            continue
        parts = _CODE_SPAN.split(line)
        # split keeps the groups: prose, fence, code, prose, fence, code, ...
        out = []
        i = 0
        while i < len(parts):
            out.append(_PLACEHOLDER.sub(r"&lt;\1&gt;", parts[i]))
            if i + 2 < len(parts):
                out.append(parts[i + 1] + parts[i + 2] + parts[i + 1])
            i += 3
        lines.append("".join(out))
    return "\n".join(lines)


class EscapePlaceholders(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_placeholders(obj.docstring.value)
