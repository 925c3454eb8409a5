"""Math rendered to MathML when the site is built: no script, no font download, works offline.

pymdownx.arithmatex (generic mode) wraps ``$…$`` and ``$$…$$`` in ``<span class="arithmatex">\\(…\\)</span>``
and ``<div class="arithmatex">\\[…\\]</div>``; this replaces each with the MathML that
latex2mathml writes, which browsers lay out natively.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.DOTALL)
_DISPLAY = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.DOTALL)


def _render(latex: str, display: bool) -> str:
    return convert(html.unescape(latex).strip(), display="block" if display else "inline")


def render_math(page_html: str) -> str:
    page_html = _DISPLAY.sub(lambda m: f'<div class="math">{_render(m.group(1), True)}</div>', page_html)
    return _INLINE.sub(lambda m: _render(m.group(1), False), page_html)
