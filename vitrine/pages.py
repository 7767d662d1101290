"""HTML pages from jinja2 templates, kept beside the module that fills them.

Every value a page shows comes from data (class names, labels, file names, notes) and is
escaped, and a variable the page lacks is an error rather than a blank.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2


@cache
def _environment(folder: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def template(path: Path) -> jinja2.Template:
    """The template at `path` (a .html.j2 file), HTML-escaped and strict."""
    return _environment(path.parent).get_template(path.name)
