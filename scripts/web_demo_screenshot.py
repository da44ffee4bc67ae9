"""Take the README's screenshot of the web demo: start scripts/web_demo.sh, ask in headless chromium, save a PNG.

    python scripts/web_demo_screenshot.py PREFIXES=ner=output/ner-ptuning_v2-64-1e-1 TEMPERATURE=0

KEY=VALUE settings go to scripts/web_demo.sh (PORT is chosen here). Needs Debian's chromium (apt-get install
chromium) and, for Chinese text, a CJK font (fonts-wqy-microhei); no browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
# One question: the tiny model answers a NER question well alone, worse with an unrelated earlier turn before it.
QUERIES = ["找出句中的人名、地名和机构名：国务院总理朱镕基昨天在人民大会堂会见了美国客人。"]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The raw text of the last reply (the bubble's aria-label; its inner text is rendered markdown).
LAST_REPLY = """() => {
  const bots = document.querySelectorAll('#chat [data-testid="bot"]');
  return bots.length ? bots[bots.length - 1].getAttribute('aria-label') : null;
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help="KEY=VALUE for scripts/web_demo.sh")
    parser.add_argument("--out", default="docs/web_demo.png")
    parser.add_argument(
        "--query", action="append", help="a message to send (repeatable); default: one NER question"
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(["bash", "scripts/web_demo.sh", f"PORT={port}", *args.settings], cwd=ROOT)
    try:
        url = wait_until_up(server, f"http://127.0.0.1:{port}/")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 640}, device_scale_factor=1)
            page.goto(url, wait_until="load")
            page.wait_for_selector("#message textarea")
            for query in args.query or QUERIES:
                before = page.locator("#chat [data-testid='bot']").count()
                page.fill("#message textarea", query)
                page.press("#message textarea", "Enter")
                page.wait_for_function(
                    "n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length > n", arg=before
                )
                wait_until_still(page)
            page.locator("#message textarea").blur()
            out = ROOT / args.out
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
        print(f"saved {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_up(server: subprocess.Popen, url: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: scripts/web_demo.sh exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return url
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: the web demo did not answer on {url} in {timeout:.0f} s")


def wait_until_still(page, quiet: float = 2.0, timeout: float = 300) -> None:
    """The reply has ended when its text has not changed for ``quiet`` seconds."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = page.evaluate(LAST_REPLY)
        if text != last:
            last, since = text, time.monotonic()
        elif text and time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
