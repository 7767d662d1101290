"""Which generator fills which marker: `<!-- generated: NAME -->` in a page under docs/."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from scripts.docs import http_api, outputs, params, reasons, results

GENERATORS: dict[str, Callable[[Path], str]] = {
    "params": params.page,
    "http-api": http_api.page,
    "outputs": outputs.page,
    "reasons": reasons.page,
    "results": results.page,
}
MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")


class UnknownMarker(KeyError):
    """A page names a generated section that does not exist."""


def fill(markdown: str, root: Path) -> str:
    """Every marker in `markdown` replaced by its generated section."""

    def generated(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise UnknownMarker(f"<!-- generated: {name} -->: known are {sorted(GENERATORS)}")
        return GENERATORS[name](root)

    return MARKER.sub(generated, markdown)
