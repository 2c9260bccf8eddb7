"""Fixtures for the real-browser tests (marker `browser`; `pytest -m browser` runs only them).

They run by default with the rest of the suite. A browser that is missing or cannot start
fails its tests with the reason; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_site import BrowserSite
from browsers import BrowserUnavailable, RunningBrowser, browser_version
from tls_peers import Pki


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: drives real headless browsers (Debian chromium and firefox-esr) through "
        "the proxy",
    )


@pytest.fixture(scope="session")
def browser_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("browser-pki"))


@pytest.fixture
def make_site() -> Iterator[Callable[..., BrowserSite]]:
    """`make_site(page_config, deflate_paths, ssl_context=...)` starts a BrowserSite; all are
    stopped (every connection thread joined) at teardown."""
    sites: list[BrowserSite] = []

    def start(*args: Any, **kwargs: Any) -> BrowserSite:
        site = BrowserSite(*args, **kwargs)
        sites.append(site)
        return site

    yield start
    for site in sites:
        site.stop()


@pytest.fixture
def launch_browser() -> Iterator[Callable[[str, str, Path], RunningBrowser]]:
    """`launch_browser(name, url, ca_file)` starts a headless browser on `url` and returns
    it with its `version` set; a browser that cannot be started fails the test with the
    reason. Every browser is stopped (its whole process group, by PID) and its profile
    removed at teardown."""
    running: list[RunningBrowser] = []

    def launch(name: str, url: str, ca_file: Path) -> RunningBrowser:
        try:
            version = browser_version(name)
            browser = RunningBrowser(name, url, ca_file)
        except BrowserUnavailable as exc:
            pytest.fail(f"{name} cannot be started: {exc}", pytrace=False)
        browser.version = version
        running.append(browser)
        return browser

    yield launch
    leftovers = {b.name: b.stop() for b in running}
    stray = {name: pids for name, pids in leftovers.items() if pids}
    assert not stray, f"processes outside the browser's group had to be killed: {stray}"
