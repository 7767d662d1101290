"""A real headless Chromium for the pages' tests (Debian's package driven by Playwright, which
cannot download its own browsers here), and where their screenshots go."""

from __future__ import annotations

import os
import time
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


def wait_for_image(page: Any, selector: str, timeout_s: float = 15.0) -> None:
    """Wait until the first image matching `selector` has loaded (naturalWidth > 0).

    Polled from here with locator.evaluate rather than page.wait_for_function: the latter
    evaluates its predicate with eval inside the page, which the pages' Content-Security-Policy
    (no 'unsafe-eval') refuses whenever the first check is not already true."""
    deadline = time.monotonic() + timeout_s
    image = page.locator(selector).first
    while not image.evaluate("img => img.naturalWidth > 0"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} did not load in {timeout_s} s")
        time.sleep(0.05)
