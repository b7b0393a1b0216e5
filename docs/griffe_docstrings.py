"""A Griffe extension that lets fmjax's docstrings render well as Google-style Markdown.

fmjax's docstrings are Google-style with a few reStructuredText habits. This extension
rewrites them, for the documentation site only (the source is untouched):

- an ``Example:`` (or ``Example (note):``) section of doctests becomes ``Examples:``, so that
  they render as code (``Example::`` with a literal block stays an admonition);
- Sphinx roles (``:func:`x```, ``:class:`~a.B```, ``:math:`...```) become inline code;
- a ``.. math::`` directive line is dropped (its indented formula renders as a code block);
- a paragraph ending in ``::`` (a reStructuredText literal block) ends in ``:``;
- a line of prose that starts with ``>`` (``>= 0``, say) is not taken for a quotation.
"""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const|math|ref):`~?([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example(?: \((.*)\))?:\s*$")
_MATH = re.compile(r"^\s*\.\. math::\s*$")


def rewrite(text: str) -> str:
    """The Markdown-friendly form of one docstring."""
    lines = []
    for line in text.splitlines():
        if _MATH.match(line):
            continue
        example = _EXAMPLE.match(line)
        if example:
            indent, note = example.groups()
            lines.append(f"{indent}Examples:")
            if note:
                lines.append(f"{indent}    {note[:1].upper()}{note[1:]}:")
            continue
        line = _ROLE.sub(lambda m: f"`{m.group(1)}`", line)
        stripped = line.lstrip()
        if stripped.startswith(">") and not stripped.startswith(">>>"):
            line = line[: len(line) - len(stripped)] + "\\" + stripped
        if line.rstrip().endswith("::") and not line.lstrip().startswith((">>>", "...")):
            line = line.rstrip()[:-1]
        lines.append(line)
    return "\n".join(lines)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every docstring with :func:`rewrite` once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
