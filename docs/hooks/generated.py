"""MkDocs hook: fills every `<!-- generated: NAME -->` marker of a page with the section
scripts.docs generates from the project's own files (params.yaml, dvc.yaml, the service's
and the library's source, the metrics under reports/), so the reference pages cannot drift
from the code. An unknown marker, or an example the service's code contradicts, fails the
build."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # scripts/ is the repository's, not an installed package
    sys.path.insert(0, str(ROOT))

from scripts.docs.http_api import DocsError  # noqa: E402
from scripts.docs.pages import UnknownMarker, fill  # noqa: E402

# What `mkdocs serve` rebuilds on: the files the generated sections are read from.
WATCHED = ("params.yaml", "dvc.yaml", "dvc.lock", "scripts/docs", "service", "vitrine", "reports")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    try:
        return fill(markdown, ROOT)
    except (UnknownMarker, DocsError) as err:
        raise PluginError(f"{page.file.src_uri}: {err}") from err


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    for path in WATCHED:
        if (ROOT / path).exists():
            server.watch(str(ROOT / path))
    return server
