"""Open every page of the built site in headless chromium: the browser test of the docs.

    python dev/docs_test.py site [--screenshots DIR]

Serves ``site/`` with ``python -m http.server`` on 127.0.0.1 (the search runs in a web worker,
which file:// URLs do not allow) and opens each page in Debian's chromium (``/usr/bin/chromium``,
driven by Playwright; no ``playwright install``). Each page must load with no console error, no
uncaught exception and no failed request, and every image on it must have loaded
(``naturalWidth > 0``); the search box must find ``DropBlock2d``. Exits with status 1 and one
line per failure otherwise. ``bash dev/docs.sh --browser`` runs it after the build.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(site: Path, port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit(f"docs_test: the server on port {port} did not start")


def pages(site: Path) -> list[str]:
    """The site's pages, as URL paths: every index.html but the search/asset folders'."""
    found = []
    for html in sorted(site.rglob("index.html")):
        rel = html.relative_to(site).parent.as_posix()
        if not rel.startswith(("assets", "search")):
            found.append("" if rel == "." else rel + "/")
    return found


def check_page(page: Page, url: str) -> list[str]:
    """Load one page; return what went wrong (console errors, failed requests, broken images)."""
    errors: list[str] = []
    page.on(
        "console",
        lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    response = page.goto(url, wait_until="load")
    if response is None or response.status != 200:
        errors.append(f"HTTP {response.status if response else 'no response'} for the page")
    page.wait_for_load_state("networkidle")
    broken = page.evaluate(
        "() => Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
    )
    errors += [f"image did not load: {src}" for src in broken]
    if page.locator("h1").count() == 0:
        errors.append("no <h1>: the page has no content")
    return errors


def check_search(page: Page, base: str) -> list[str]:
    """Type into the search box (key by key: Material listens to key events) until the index answers."""
    page.goto(base, wait_until="load")
    page.locator("label.md-search__icon, .md-search__input").first.click()
    box = page.locator("input.md-search__input")
    wanted = ".md-search-result__link[href*='#spatialdrop.DropBlock2d']"
    for _ in range(3):  # the index loads in a web worker: the first keys may come before it is ready
        box.fill("")
        box.press_sequentially("DropBlock2d", delay=30)
        try:
            page.wait_for_selector(wanted, timeout=10000)
            return []
        except Exception:
            continue
    meta = page.locator(".md-search-result__meta").inner_text()
    return [f"search: no result for 'DropBlock2d' links to its API entry ({meta!r})"]


def main(argv: list[str] | None = None) -> int:
    """Serve the site, check every page and the search; 0 when all passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build --site-dir)")
    parser.add_argument("--screenshots", type=Path, help="write a full-page PNG of each page here")
    args = parser.parse_args(argv)
    urls = pages(args.site)
    if len(urls) < 2:
        print(f"docs_test: {args.site} holds {len(urls)} pages: build it first (bash dev/docs.sh)")
        return 1
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    server = _serve(args.site, port)
    failures: list[str] = []
    start = time.monotonic()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            for rel in urls:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                failures += [f"/{rel}: {e}" for e in check_page(page, base + rel)]
                if args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    name = rel.strip("/").replace("/", "_") or "index"
                    page.screenshot(path=str(args.screenshots / f"{name}.png"), full_page=False)
                page.close()
            page = browser.new_page()
            failures += check_search(page, base)
            browser.close()
    finally:
        server.terminate()
        server.wait()
    for failure in failures:
        print(failure)
    print(f"docs_test: {len(urls)} pages, search, {len(failures)} failures, {time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
