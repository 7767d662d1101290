"""`python -m scripts.docs NAME`: print one generated section, as the site build inserts it."""

from __future__ import annotations

import sys
from pathlib import Path

from scripts.docs.pages import GENERATORS

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    names = sys.argv[1:] or sorted(GENERATORS)
    unknown = sorted(set(names) - set(GENERATORS))
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; known: {sorted(GENERATORS)}")
    for name in names:
        print(GENERATORS[name](ROOT))
