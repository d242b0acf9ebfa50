"""Making user strings (class names, paths, overrides, model names) inert in the files we write.

A class folder may be named ``<img src=x onerror=alert(1)>`` or ``a|b``, a file ``=1+2.png``: written raw,
the first runs script in a Markdown viewer that allows HTML, the second splits a table row, the third
runs as a formula when predictions.csv is opened in a spreadsheet.
"""

from __future__ import annotations

import html
import re
from typing import Any

# backslash-escaped wherever they occur: emphasis, code, links/images, tables, headings, extensions
# (not parentheses: a link's destination needs a "]" before them, and "[" "]" are escaped; a terminal
# showing summary.md reads "(mean ± 95% CI)", not "\(mean ± 95% CI\)")
_MD_INLINE = re.compile(r"([\\`*\[\]#|!{}~])")
# `_` between two letters/digits cannot start or end emphasis (CommonMark): left as is, so config keys
# (data.val_fraction, acc_best) stay readable in the raw file
_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")
# significant only where a block starts (the start of the string, as line breaks are collapsed):
# a bullet (`- `, `+ `) or an ordered-list marker (`1. `, `1) `)
_MD_BLOCK_START = re.compile(r"^(\s*(?:\d{1,9})?)([-+.)])(?=\s|$)")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def md_escape(value: Any) -> str:
    """Make any value inert in Markdown and in the HTML a Markdown renderer lets through.

    ``& < >`` become HTML entities (no tag, entity or autolink can form), Markdown punctuation is
    backslash-escaped (no emphasis, link, image, code span or table cell border), a leading list
    marker is escaped, and line breaks collapse to one space so a table row or list item stays one line.
    Rendered, the text reads exactly as ``str(value)`` (line breaks aside).

    Args:
        value: Anything; ``str(value)`` is escaped.

    Returns:
        The escaped one-line text.
    """
    text = _LINE_BREAKS.sub(" ", str(value))
    text = _MD_INLINE.sub(r"\\\1", text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    text = _MD_BLOCK_START.sub(r"\1\\\2", text)
    return html.escape(text, quote=False)


def csv_cell(value: Any) -> Any:
    """Neutralise a user-derived CSV cell a spreadsheet would run as a formula (OWASP's advice).

    A string starting with ``= + - @``, a tab or a carriage return gets a leading ``'``, which
    spreadsheets show as text; everything else (numbers included) is returned unchanged.

    Args:
        value: A cell value.

    Returns:
        The value, or the prefixed string.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def plain(text: Any) -> str:
    """``text`` for a matplotlib title, label, tick or table cell: ``$`` escaped, so a class or run name never
    switches on mathtext (``$x^$`` would fail to render, ``$x$`` would show as math)."""
    return str(text).replace("$", r"\$")
