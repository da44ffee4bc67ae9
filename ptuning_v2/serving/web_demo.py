"""A Gradio chat page for one backbone and its prefixes (``bash scripts/web_demo.sh``).

    python -m ptuning_v2.serving.web_demo --model models/glm-zh-tiny --prefixes ner=output/ner-ptuning_v2-64-1e-1

Replies stream into the page; the prefix (or none) and the sampling settings can change between turns. Every
browser tab has its own conversation, and replies for different tabs and prefixes are decoded in one batch by
the shared engine. It serves on 127.0.0.1 unless told otherwise, makes no share link, sends no analytics, and
the page loads nothing from outside the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

# Gradio reads these when it is imported: no usage statistics, no version check against PyPI.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from ..generation import GenerationSettings  # noqa: E402
from .conversation import NO_PREFIX, add_model_arguments, fit_history, initial_prefix, load_engine  # noqa: E402
from .engine import Engine, SamplingParams  # noqa: E402

TITLE = "P-Tuning v2 chat"
UPDATE_INTERVAL = 0.05  # seconds between two redraws of a streaming reply


class WebDemo:
    """The page's callbacks. Each tab's conversation lives in its Chatbot; stop events are kept per session."""

    def __init__(self, engine: Engine, max_new_tokens: int, top_p: float, temperature: float) -> None:
        self.engine = engine
        self.defaults = {"max_new_tokens": max_new_tokens, "top_p": top_p, "temperature": temperature}
        self._running: dict[str, threading.Event] = {}  # session -> the cancel event of its reply
        self._lock = threading.Lock()

    def respond(
        self,
        message: str,
        chat: list[dict[str, Any]],
        prefix: str,
        max_new_tokens: float,
        top_p: float,
        temperature: float,
        request: gr.Request,
    ) -> Iterator[tuple[str, list[dict[str, str]]]]:
        """Yield (input box, chat) as the reply grows; the partial reply stays if it is stopped."""
        if not message.strip():
            yield message, chat
            return
        params = SamplingParams(
            max_new_tokens=int(max_new_tokens),
            # temperature 0 is greedy: the engine then takes the most likely token
            do_sample=temperature > 0,
            temperature=float(temperature),
            top_p=float(top_p),
        )
        conversation = [*_plain(chat), {"role": "user", "content": message}]
        cancel = threading.Event()
        try:
            # The page keeps showing every turn; the model gets the newest ones that fit its context.
            prompt, _ = fit_history(self.engine, conversation, params.max_new_tokens)
            generation = self.engine.stream(prompt, None if prefix == NO_PREFIX else prefix, params, cancel)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        session = getattr(request, "session_hash", None) or ""
        with self._lock:
            self._running[session] = cancel
        answer, last_update = "", time.monotonic()
        try:
            yield "", [*conversation, {"role": "assistant", "content": answer}]
            for delta in generation:
                answer += delta
                # A small model on a fast machine makes hundreds of tokens a second; redrawing the page for each
                # would swamp the browser. Deltas that come sooner than UPDATE_INTERVAL wait for the next one.
                if time.monotonic() - last_update >= UPDATE_INTERVAL:
                    last_update = time.monotonic()
                    yield "", [*conversation, {"role": "assistant", "content": answer}]
            yield "", [*conversation, {"role": "assistant", "content": answer}]
        finally:
            # A closed tab or a generator Gradio dropped: free the batch slot at once.
            cancel.set()
            with self._lock:
                if self._running.get(session) is cancel:
                    del self._running[session]

    def stop(self, request: gr.Request) -> None:
        """Stop this tab's reply (the Stop button, Clear, or the tab closing)."""
        session = getattr(request, "session_hash", None) or ""
        with self._lock:
            cancel = self._running.get(session)
        if cancel is not None:
            cancel.set()

    def clear(self, request: gr.Request) -> tuple[list, str]:
        self.stop(request)
        return [], ""

    def build(self) -> gr.Blocks:
        """The page: the chat and its input on the left; the prefix, the sliders and Clear on the right."""
        engine = self.engine
        choices = [(name, name) for name in engine.prefix_names] + [
            (f"{NO_PREFIX} (bare backbone)", NO_PREFIX)
        ]
        with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
            gr.Markdown(f"## {TITLE} · `{engine.model_name}`")
            with gr.Row():
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(
                        label="Chat",
                        height=460,
                        elem_id="chat",
                        buttons=["copy"],
                        feedback_options=None,
                        placeholder="Type a message below; the prefix and the sampling can change between turns.",
                    )
                    with gr.Row():
                        message = gr.Textbox(
                            show_label=False,
                            placeholder="Message (Enter to send)",
                            scale=5,
                            elem_id="message",
                            autofocus=True,
                        )
                        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                        stop = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
                with gr.Column(scale=1, min_width=240):
                    prefix = gr.Dropdown(
                        choices,
                        value=initial_prefix(engine, None) or NO_PREFIX,
                        label="Prefix",
                        elem_id="prefix",
                    )
                    max_new_tokens = gr.Slider(
                        1,
                        engine.context_length,
                        value=min(self.defaults["max_new_tokens"], engine.context_length),
                        step=1,
                        label="Max length (new tokens)",
                        elem_id="max_new_tokens",
                    )
                    top_p = gr.Slider(
                        0.01, 1.0, value=self.defaults["top_p"], step=0.01, label="Top p", elem_id="top_p"
                    )
                    temperature = gr.Slider(
                        0.0,
                        2.0,
                        value=self.defaults["temperature"],
                        step=0.01,
                        label="Temperature (0: greedy)",
                        elem_id="temperature",
                    )
                    clear = gr.Button("Clear history", elem_id="clear")
            inputs = [message, chatbot, prefix, max_new_tokens, top_p, temperature]
            # trigger_mode="once": a second Enter while a reply streams is ignored, not queued behind it.
            for event in (message.submit, send.click):
                event(self.respond, inputs, [message, chatbot], trigger_mode="once")
            stop.click(self.stop, None, None, queue=False)
            clear.click(self.clear, None, [chatbot, message], queue=False)
            chatbot.clear(self.stop, None, None, queue=False)  # the chat's own trash icon
            demo.unload(self.stop)
        # As many replies at once as the engine batches: tabs then share decoding steps.
        demo.queue(default_concurrency_limit=engine.max_batch_size)
        return demo


def _plain(chat: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Gradio's messages (content as a list of parts) -> the engine's ``{role, content}`` with plain text."""
    plain = []
    for message in chat or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        plain.append({"role": message["role"], "content": content or ""})
    return plain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    # The sliders start at the generation settings every entry point shares.
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=GenerationSettings.max_new_tokens,
        help="the slider's starting value",
    )
    parser.add_argument(
        "--top_p", type=float, default=GenerationSettings.top_p, help="the slider's starting value"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=GenerationSettings.temperature,
        help="the slider's starting value (0: greedy)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    ).check()  # bad settings fail before the model loads
    engine = load_engine(args)
    try:
        demo = WebDemo(engine, args.max_new_tokens, args.top_p, args.temperature).build()
        served = ", ".join(f"{n} ({engine.prefixes[n].path})" for n in engine.prefix_names) or NO_PREFIX
        print(f"web demo of {engine.model_name} with prefixes: {served}", flush=True)
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            inbrowser=False,
            ssr_mode=False,  # no Node server next to ours
            mcp_server=False,
            footer_links=[],
        )
    finally:
        engine.close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # a bad setting, a prefix that does not fit, a port in use
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
