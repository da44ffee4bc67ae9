"""Chat with a backbone and its prefixes in the terminal, the reply streamed as it is generated.

    bash scripts/chat.sh                                # embedded tiny GLM (+ the main job's prefix, if trained)
    python -m ptuning_v2.chat --model models/glm-zh-tiny --checkpoint output/ner-ptuning_v2-64-1e-1
    python -m ptuning_v2.chat --prefixes ner=output/ner-...,sent=output/sent-... --prefix sent
    python -m ptuning_v2.chat --model ... --checkpoint ... --query "找出句中的人名、地名和机构名：李鹏在北京会见了新华社记者。"

In the session: ``clear`` forgets the history, ``exit`` (or Ctrl-D, or Ctrl-C twice at the prompt) leaves,
``/prefix`` lists the loaded prefixes, ``/prefix NAME`` switches to one, ``/prefix none`` to the bare backbone.
Ctrl-C during a reply stops that reply; what was shown of it stays in the history (``clear`` drops it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TextIO

from transformers import HfArgumentParser

from ..generation import GenerationSettings
from ..spellings import parse_bool
from .conversation import (
    NO_PREFIX,
    add_model_arguments,
    fit_history,
    initial_prefix,
    load_engine,
    parse_prefix_choice,
)
from .engine import Engine, SamplingParams

USER_PROMPT = "\n用户: "
HELP = (
    "'clear' forgets the history, 'exit' leaves; '/prefix' lists the prefixes, '/prefix NAME' switches "
    f"('/prefix {NO_PREFIX}': the bare backbone); Ctrl-C stops a reply"
)


class TerminalChat:
    """The read-reply loop. The history holds plain ``{role, content}`` messages, as the engine takes them."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        prefix: str | None = None,
        system: str | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.engine = engine
        self.params = params
        self.prefix = prefix
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = list(self.system)
        self.out = out

    def run(self) -> None:
        _own_ctrl_c()
        self.say(f"{self.engine.model_name} with prefix: {self.prefix or NO_PREFIX} | {HELP}")
        interrupted = False  # the last prompt ended with Ctrl-C: a second one in a row quits
        while True:
            try:
                line = input(USER_PROMPT)
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                if interrupted:
                    self.say("")
                    return
                self.say("\n(Ctrl-C again, 'exit' or Ctrl-D to quit)")
                interrupted = True
                continue
            interrupted = False
            try:
                if not self.handle(line.strip()):
                    return
            except KeyboardInterrupt:  # between a reply's end and the next prompt: nothing to stop
                self.say("")

    def handle(self, line: str) -> bool:
        """Carry out one line; False when the session should end."""
        if line in ("exit", "quit"):
            return False
        if line == "clear":
            self.history = list(self.system)
            self.say("(history cleared)")
        elif line == "/prefix" or line.startswith("/prefix "):
            self.switch_prefix(line.removeprefix("/prefix").strip())
        elif line in ("/help", "help"):
            self.say(HELP)
        elif line:
            self.reply(line)
        return True

    def switch_prefix(self, choice: str) -> None:
        if not choice:
            for name in self.engine.prefix_names:
                mark = "*" if name == self.prefix else " "
                self.say(f"{mark} {name}  {self.engine.prefixes[name].path}")
            self.say(f"{'*' if self.prefix is None else ' '} {NO_PREFIX}  (the bare backbone)")
            return
        try:
            self.prefix = parse_prefix_choice(self.engine, choice)
        except ValueError as err:
            self.say(f"error: {err}")
            return
        self.say(f"(prefix: {self.prefix or NO_PREFIX}; the history is kept, 'clear' drops it)")

    def reply(self, query: str) -> None:
        """Stream the answer to ``query``; it joins the history when it was generated, even partly."""
        try:
            messages, dropped = fit_history(
                self.engine, [*self.history, {"role": "user", "content": query}], self.params.max_new_tokens
            )
            cancel = threading.Event()
            generation = self.engine.stream(messages, self.prefix, self.params, cancel)
        except ValueError as err:  # e.g. a message too long for the context on its own
            self.say(f"error: {err}")
            return
        if dropped:
            self.say(f"(the {dropped} oldest messages no longer fit the context and are left out)")
        self.write(f"助手 [{self.prefix or NO_PREFIX}]: ")
        parts: list[str] = []
        with _ctrl_c_cancels(cancel):
            try:
                for delta in generation:
                    parts.append(delta)
                    self.write(delta)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the engine to notice the first
                generation.cancel()
            except RuntimeError as err:  # the engine failed this request (out of memory...)
                self.say(f"\nerror: {err}")
                return
        ending = {"cancelled": " [stopped]", "length": " [max_new_tokens reached]"}
        self.say(ending.get(generation.finish_reason or "cancelled", ""))
        self.history = [*messages, {"role": "assistant", "content": "".join(parts)}]

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def say(self, line: str) -> None:
        self.write(line + "\n")


def _own_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt in the chat, also when it was started with SIGINT ignored: a parent that
    ignores it passes that on through exec and Python then leaves it ignored, so Ctrl-C would stop a reply (its
    handler is installed for the reply) but do nothing at the prompt."""
    if threading.current_thread() is threading.main_thread() and not callable(
        signal.getsignal(signal.SIGINT)
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _ctrl_c_cancels:
    """While a reply streams, Ctrl-C sets its cancel event instead of raising: the engine ends the reply at its
    next token and the loop goes on. A second Ctrl-C raises KeyboardInterrupt, in case the engine is slow to stop
    (a long prompt still in prefill)."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        # signal handlers can only be set from the main thread (a TerminalChat run elsewhere keeps the default)
        self.active = threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame: object) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt
        self.cancel.set()

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, GenerationSettings]:
    """The chat's own flags, and the generation flags every entry point shares (``GenerationSettings``)."""
    parser = HfArgumentParser(GenerationSettings, description=__doc__.splitlines()[0])
    for action in parser._actions:  # every boolean flag takes the spellings of parse_bool
        if getattr(action.type, "__name__", "") == "string_to_bool":
            action.type = parse_bool
    add_model_arguments(parser)
    parser.add_argument("--query", default=None, help="answer one query (no streaming) and exit")
    parser.add_argument("--system", default=None, help="a system message for the conversation")
    parser.add_argument("--seed", type=int, default=None, help="makes sampled replies reproducible")
    generation, args = parser.parse_args_into_dataclasses(args=argv)
    return args, generation


def main(argv: list[str] | None = None) -> None:
    args, generation = parse_args(argv)
    params = SamplingParams(
        max_new_tokens=generation.max_new_tokens,
        do_sample=generation.do_sample,
        temperature=generation.temperature,
        top_p=generation.top_p,
        seed=args.seed,
    )
    params.check()  # bad settings fail before the model loads
    engine = load_engine(args)
    try:
        prefix = initial_prefix(engine, args.prefix)
        chat = TerminalChat(engine, params, prefix, args.system)
        if args.query is None:
            _line_editing()
            chat.run()
        else:
            print(
                engine.complete([*chat.history, {"role": "user", "content": args.query}], prefix, params).text
            )
    finally:
        engine.close()


def _line_editing() -> None:
    """Arrow keys and history in input(), where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what switches input() over)
    except ImportError:
        pass


def cli() -> None:
    """``python -m ptuning_v2.chat``: errors as one line and exit status 1, Ctrl-C while loading as 130."""
    try:
        main()
    except (ValueError, OSError) as err:  # a bad setting, a prefix that does not fit, missing files
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
