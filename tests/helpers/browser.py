"""A real headless Chromium for the pages' tests (Debian's package driven by Playwright, which
cannot download its own browsers here), and where their screenshots go."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots; ignored by git (see its .gitignore)
CHROMIUM = Path("/usr/bin/chromium")


def chromium_or_skip() -> Path:
    """Chromium, or a skip with the reason outside CI (CI installs it: .ci/run)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI runs this test")


@contextmanager
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    """(a fresh page, the console messages in which its Content-Security-Policy refused
    something): the tests assert that list stays empty."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            blocked: list[str] = []
            page.on(
                "console",
                lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
            )
            yield page, blocked
        finally:
            browser.close()
