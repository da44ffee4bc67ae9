"""The terminal chat (``bash scripts/chat.sh``) driven through a pseudo-terminal, as a person would use it.

The tiny backbone never ends a reply on its own (see chat_fixtures), so a reply runs to MAX_NEW_TOKENS: long
ones to catch while streaming, short ones to compare with what the engine answers for the same conversation.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from chat_fixtures import build_chat_fixture

from ptuning_v2.serving.engine import Engine, SamplingParams

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "用户: "
# What ends a reply: the marker of its finish reason (stopped, or cut at MAX_NEW_TOKENS), then the next prompt.
ENDED = re.compile(r" \[(stopped|max_new_tokens reached)\]\r?\n")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    return build_chat_fixture(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def engine(paths):
    engine = Engine.load(
        str(paths["model"]), {"ours": str(paths["ours"]), "official": str(paths["official"])}
    )
    yield engine
    engine.close()


def start_chat(paths: dict[str, Path], max_new_tokens: int, **spawn: object) -> pexpect.spawn:
    settings = [
        f"MODEL={paths['model']}",
        f"PREFIXES=ours={paths['ours']},official={paths['official']}",
        f"MAX_NEW_TOKENS={max_new_tokens}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    # scripts/chat.sh runs the `python` on PATH: the one running these tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    child = pexpect.spawn(
        "bash",
        ["scripts/chat.sh", *settings],
        cwd=ROOT,
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        dimensions=(40, 200),
        **spawn,
    )
    child.expect_exact("with prefix: ours")
    child.expect_exact(PROMPT)
    return child


def test_ctrl_c_works_when_the_chat_was_started_with_it_ignored(paths):
    """A parent that ignores SIGINT passes that on through exec, and Python then leaves it ignored (pytest's own
    process can end up so after other tests): Ctrl-C at the prompt must still say how to leave, and quit."""
    child = start_chat(
        paths, max_new_tokens=4, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    try:
        child.sendline("你好")
        child.expect(ENDED)
        child.expect_exact(PROMPT)
        child.sendintr()
        child.expect_exact("Ctrl-C again", timeout=30)
        child.expect_exact(PROMPT)
        child.sendintr()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


def clean(text: str) -> str:
    """What the program wrote, as it wrote it: the terminal turns each newline into CR LF."""
    return text.replace("\r\n", "\n")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_reply_streams_and_ctrl_c_stops_it_without_leaving(paths, engine):
    child = start_chat(paths, max_new_tokens=15000)
    try:
        child.sendline("北京天气怎么样")
        child.expect_exact("助手 [ours]: ")
        # Read what arrives while the reply is generated: text keeps coming in separate reads.
        reads = []
        deadline = time.monotonic() + 60
        while len(reads) < 3 and time.monotonic() < deadline:
            try:
                chunk = child.read_nonblocking(4096, timeout=5)
            except pexpect.TIMEOUT:
                continue
            assert "[max_new_tokens reached]" not in chunk and "[stopped]" not in chunk, "the reply had ended"
            reads.append(chunk)
            time.sleep(0.05)
        assert len(reads) >= 3 and all(reads), reads

        # Ctrl-C while it still runs (15000 tokens take well over 10 s here): that reply stops...
        child.sendintr()
        child.expect_exact(" [stopped]")
        child.expect_exact(PROMPT)
        # ...the program stays, and a command still works
        child.sendline("/prefix")
        child.expect(r"\* ours  ")
        child.expect_exact(PROMPT)
        assert child.isalive()

        # Ctrl-C at the prompt only says how to leave; a second one in a row quits.
        child.sendintr()
        child.expect_exact("Ctrl-C again")
        child.expect_exact(PROMPT)
        assert child.isalive()
        child.sendintr()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


def test_clear_prefix_and_exit(paths, engine):
    child = start_chat(paths, max_new_tokens=12)
    params = SamplingParams(max_new_tokens=12)
    try:
        first = reply(child, "北京", "ours")
        assert first == engine.complete(user("北京"), "ours", params).text
        # The second turn is answered in the context of the first.
        second = reply(child, "上海", "ours")
        history = [*user("北京"), {"role": "assistant", "content": first}, *user("上海")]
        assert second == engine.complete(history, "ours", params).text

        child.sendline("clear")
        child.expect_exact("(history cleared)")
        child.expect_exact(PROMPT)
        fresh = engine.complete(user("上海"), "ours", params).text
        assert fresh != second  # so that the next check can tell a cleared history from a kept one
        assert reply(child, "上海", "ours") == fresh

        # /prefix NAME switches (the history is kept), /prefix none is the bare backbone
        answers = {"ours": fresh}
        for name, prefix in (("official", "official"), ("none", None)):
            child.sendline("clear")
            child.expect_exact(PROMPT)
            child.sendline(f"/prefix {name}")
            child.expect_exact(f"(prefix: {name};")
            child.expect_exact(PROMPT)
            answers[name] = reply(child, "上海", name)
            assert answers[name] == engine.complete(user("上海"), prefix, params).text
        assert len(set(answers.values())) == 3  # the three really differ

        child.sendline("/prefix nope")
        child.expect_exact("error: no prefix 'nope'; loaded: ours, official, none")
        child.expect_exact(PROMPT)

        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def reply(child: pexpect.spawn, query: str, prefix: str) -> str:
    """Send a query; the whole reply, once it has ended (before the next prompt)."""
    child.sendline(query)
    child.expect_exact(f"助手 [{prefix}]: ")
    child.expect(ENDED)
    text = clean(child.before)
    child.expect_exact(PROMPT)
    return text


def test_which_prefixes_load(tmp_path, monkeypatch):
    """The main job's prefix is the default on the embedded model only: it would not fit another backbone."""
    from ptuning_v2 import chat
    from ptuning_v2.serving import conversation

    monkeypatch.setattr(conversation, "default_prefixes", lambda: {"ner": "output/ner-ptuning_v2-64-1e-1"})

    def loaded(*argv: str) -> dict[str, str]:
        return conversation.prefixes_from_args(chat.parse_args(list(argv))[0])

    assert loaded() == {"ner": "output/ner-ptuning_v2-64-1e-1"}
    assert loaded("--prefixes", "") == {}
    assert loaded("--model", "/models/chatglm3-6b") == {}
    assert loaded("--model", "/m", "--prefixes", "a=/x,b=/y") == {"a": "/x", "b": "/y"}
    # --checkpoint alone loads just that one, named after its directory (THUDM's checkpoint-N: run-N)
    assert loaded("--checkpoint", "/ckpt/adgen-pt-128/checkpoint-3000") == {
        "adgen-pt-128-3000": "/ckpt/adgen-pt-128/checkpoint-3000"
    }
    assert loaded("--checkpoint", "/o/ner", "--prefixes", "b=/y") == {"ner": "/o/ner", "b": "/y"}
    with pytest.raises(ValueError, match="named 'ner'"):
        loaded("--checkpoint", "/o/ner", "--prefixes", "ner=/y")
    with pytest.raises(ValueError, match="bare backbone"):
        loaded("--prefixes", "none=/y")
