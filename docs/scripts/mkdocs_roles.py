"""mkdocs hook: the docstrings' Sphinx cross-reference roles as code in the API reference.

The docstrings use roles such as ``:func:`~cm_monitor.cm_dimension``` (readable in ``help()``);
mkdocstrings renders Markdown, where they would show as ``:func:`` before the code. This hook turns
each into the code alone, the last component of the path where the role says ``~``.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):<code>(~?)([\w.]+)</code>")
_RAW = re.compile(r":?(?:func|class|meth|attr|data|mod|exc|obj):`(~?)([\w.]+)`")


def _name(match: re.Match) -> str:
    tilde, path = match.group(1), match.group(2)
    return f"<code>{path.rsplit('.', 1)[-1] if tilde else path}</code>"


def on_page_content(html: str, **kwargs) -> str:
    """Called by mkdocs for each page's HTML."""
    return _RAW.sub(_name, _ROLE.sub(_name, html))
