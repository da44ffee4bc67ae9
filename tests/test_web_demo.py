"""The web demo (``bash scripts/web_demo.sh``) in a real headless browser: Debian's chromium driven by Playwright.

The page is served on a free loopback port by the script itself. The tiny backbone never ends a reply on its own
(see chat_fixtures), so each reply runs to the length set on the page, and greedy decoding (TEMPERATURE=0) makes
each one equal to what the engine answers for the same conversation and prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from chat_fixtures import build_chat_fixture, free_port

from ptuning_v2.serving.engine import Engine, SamplingParams

sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags chromium reaches out for updates and field trials (and on machines
# without a network, connections then get refused en masse).
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
MAX_NEW_TOKENS = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"needs chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]

# The assistant's messages as the page holds them: the aria-label is the raw text (the bubble shows it rendered
# as markdown, which a random model's output would garble).
LAST_REPLY = """() => {
  const bots = document.querySelectorAll('#chat [data-testid="bot"]');
  if (!bots.length) return null;
  return bots[bots.length - 1].getAttribute('aria-label').replace(/^bot's message: /, '');
}"""
# Every distinct value the last reply takes while it streams.
WATCH_REPLIES = (
    """() => {
  window.replySnapshots = [];
  const read = """
    + LAST_REPLY
    + """;
  new MutationObserver(() => {
    const text = read();
    const seen = window.replySnapshots;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true, attributes: true});
}"""
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    return build_chat_fixture(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def engine(paths):
    engine = Engine.load(
        str(paths["model"]), {"ours": str(paths["ours"]), "official": str(paths["official"])}
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(paths):
    port = free_port()
    settings = [
        f"PORT={port}",
        f"MODEL={paths['model']}",
        f"PREFIXES=ours={paths['ours']},official={paths['official']}",
        f"MAX_NEW_TOKENS={MAX_NEW_TOKENS}",
        "TEMPERATURE=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(paths["model"].parent / "web_demo.log", "w+")
    process = subprocess.Popen(
        ["bash", "scripts/web_demo.sh", *settings], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < deadline, "the web demo did not come up in 180 s\n" + _tail(log)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        page.set_default_timeout(60_000)
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        page.goto(server, wait_until="load")
        page.wait_for_selector("#message textarea")
        page.evaluate(WATCH_REPLIES)
        yield page
        browser.close()


def send(page, text: str) -> None:
    page.evaluate("() => { window.replySnapshots = []; }")
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def wait_for_reply(page, expected: str) -> str:
    """Wait until the last reply is exactly ``expected`` (the whole reply: the engine's answer)."""
    page.wait_for_function(f"expected => ({LAST_REPLY})() === expected", arg=expected)
    return page.evaluate(LAST_REPLY)


def choose_prefix(page, label: str) -> None:
    page.click("#prefix input")
    page.get_by_role("option", name=label, exact=True).click()
    page.wait_for_function("label => document.querySelector('#prefix input').value === label", arg=label)


def messages_shown(page) -> int:
    return page.locator("#chat [data-testid='user'], #chat [data-testid='bot']").count()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_streams_switches_prefix_stops_and_clears(page, engine, server):
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    assert page.input_value("#prefix input") == "ours"  # the first loaded prefix

    # A message, its reply streamed into the page.
    send(page, "北京天气怎么样")
    first = engine.complete(user("北京天气怎么样"), "ours", params).text
    assert len(first) > 300
    wait_for_reply(page, first)
    snapshots = page.evaluate("() => window.replySnapshots")
    growing = [s for s in snapshots if s and s != first]
    assert len(growing) >= 2, f"the reply arrived in {len(snapshots)} update(s): not streamed"
    assert all(first.startswith(s) for s in growing)
    assert page.input_value("#message textarea") == ""

    # Another prefix answers the next turn, with the history.
    choose_prefix(page, "official")
    send(page, "上海")
    history = [*user("北京天气怎么样"), {"role": "assistant", "content": first}, *user("上海")]
    with_history = engine.complete(history, "official", params).text
    wait_for_reply(page, with_history)
    assert messages_shown(page) == 4

    # Clear empties the page and the history: the same question now gets the fresh answer.
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"bot\"]')")
    assert messages_shown(page) == 0
    send(page, "上海")
    fresh = engine.complete(user("上海"), "official", params).text
    assert fresh != with_history
    wait_for_reply(page, fresh)
    assert messages_shown(page) == 2

    # The bare backbone.
    choose_prefix(page, "none (bare backbone)")
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"bot\"]')")
    send(page, "上海")
    bare = engine.complete(user("上海"), None, params).text
    assert bare != fresh
    wait_for_reply(page, bare)

    # Stop: a reply allowed 12000 tokens is stopped early and keeps what it had.
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"bot\"]')")
    page.fill("#max_new_tokens input[type=number]", "12000")
    page.press("#max_new_tokens input[type=number]", "Enter")
    send(page, "北京")
    page.wait_for_function("() => window.replySnapshots.length >= 3")
    page.click("#stop")
    stopped = page.evaluate(LAST_REPLY)
    time.sleep(2)
    after = page.evaluate(LAST_REPLY)
    time.sleep(1)
    assert page.evaluate(LAST_REPLY) == after  # no longer growing
    assert stopped and len(after) < 12000
    # what it kept is the start of the reply (one character per token with this tokenizer)
    assert engine.complete(
        user("北京"), None, SamplingParams(max_new_tokens=len(after) + 20)
    ).text.startswith(after)

    # Nothing was fetched from anywhere but the demo's own server (it works offline).
    hosts = {urlparse(url).netloc for url in page.requested if not url.startswith(("data:", "blob:"))}
    assert hosts == {urlparse(server).netloc}, hosts


def test_closing_the_tab_frees_the_reply(paths):
    """A tab closed while its reply streams: the engine drops that row at once instead of decoding for nobody."""
    from ptuning_v2.serving.web_demo import WebDemo

    engine = Engine.load(str(paths["model"]), {"ours": str(paths["ours"])})
    demo = WebDemo(engine, max_new_tokens=12000, top_p=0.7, temperature=0).build()
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.wait_for_selector("#message textarea")
            page.evaluate(WATCH_REPLIES)
            send(page, "北京")
            page.wait_for_function("() => window.replySnapshots.length >= 3")
            assert engine.stats["running"] == 1
            page.close()
            deadline = time.monotonic() + 20
            while engine.stats["running"] and time.monotonic() < deadline:
                time.sleep(0.1)
            browser.close()
        assert engine.stats["running"] == 0 and engine.stats["cancelled"] == 1
        assert engine.stats["steps"] < 6000  # stopped long before its 12000 tokens
    finally:
        demo.close()
        engine.close()
