"""What the terminal chat and the web demo share on top of the engine: which backbone and prefixes to load, the
names a user picks a prefix by, and keeping a growing conversation inside the model's context.

Generation itself (conversation -> prompt ids -> streamed text) is the engine's, the same for the API server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .engine import Engine
from .settings import DEFAULT_MODEL, default_prefixes, parse_prefixes

# The word that picks the bare backbone in `/prefix none` and in the web page's prefix choice.
NO_PREFIX = "none"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The backbone and prefix flags both chat front ends take."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="backbone (a directory or a Hub name)")
    parser.add_argument("--quantization_bit", default=None, help="4 or 8 to load the backbone quantised")
    parser.add_argument(
        "--prefixes",
        default=None,
        help="NAME=PATH[,NAME=PATH...]: prefix checkpoints (ours, official ChatGLM ptuning, PEFT); "
        "'' for none. Default: the main job's prefix, when it exists and --model is the embedded model",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="one more prefix checkpoint, named after its directory"
    )
    parser.add_argument(
        "--prefix", default=None, help=f"the prefix to start with (default: the first loaded; '{NO_PREFIX}')"
    )


def prefixes_from_args(args: argparse.Namespace) -> dict[str, str]:
    """Name -> path of every prefix to load; ValueError for a bad list or a name used twice."""
    if args.prefixes is not None:
        prefixes = parse_prefixes(args.prefixes)
    elif args.checkpoint is None and args.model == DEFAULT_MODEL:
        # The main job trains on the embedded model; its prefix would not fit another backbone.
        prefixes = default_prefixes()
    else:
        prefixes = {}
    if args.checkpoint is not None:
        name = checkpoint_name(args.checkpoint)
        if name in prefixes:
            raise ValueError(f"--checkpoint is named {name!r}, as a prefix in --prefixes already is")
        prefixes = {name: args.checkpoint, **prefixes}
    if NO_PREFIX in prefixes:
        raise ValueError(f"'{NO_PREFIX}' means the bare backbone; give that prefix another name")
    return prefixes


def checkpoint_name(path: str) -> str:
    """A prefix's name from its path: the directory's name, or its parent's for THUDM's ``.../checkpoint-3000``."""
    location = Path(path)
    if location.name.startswith("checkpoint-") and location.parent.name:
        return f"{location.parent.name}-{location.name.removeprefix('checkpoint-')}"
    return location.name or str(path)


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine for these flags; a prefix that does not fit the backbone fails here, before any chat."""
    return Engine.load(args.model, prefixes_from_args(args), args.quantization_bit)


def initial_prefix(engine: Engine, wanted: str | None) -> str | None:
    """The prefix a session starts with: ``wanted`` (a name or 'none'), else the first loaded one, else none."""
    if wanted is None:
        return engine.prefix_names[0] if engine.prefix_names else None
    return parse_prefix_choice(engine, wanted)


def parse_prefix_choice(engine: Engine, choice: str) -> str | None:
    """A loaded prefix's name, or None for 'none' / the backbone's name; ValueError listing the choices."""
    if choice == NO_PREFIX:
        return None
    try:
        table = engine.resolve_prefix(choice)
    except ValueError:
        raise ValueError(
            f"no prefix {choice!r}; loaded: {', '.join([*engine.prefix_names, NO_PREFIX])}"
        ) from None
    return table.name if table else None


def fit_history(
    engine: Engine, messages: list[dict[str, str]], max_new_tokens: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until the prompt leaves room for the reply (a system message stays).

    Returns the messages to send and how many were dropped. The last message is never dropped: if it alone does
    not fit, the engine refuses it with a message that says so.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    # Leave room for at least a short reply even when max_new_tokens asks for the whole context.
    room = min(max_new_tokens, engine.context_length // 4)
    dropped = 0
    while len(turns) > 1 and len(engine.prompt_ids(system + turns)) + room > engine.context_length:
        # A user turn and the answer to it go together, so the conversation still starts with the user.
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut
    return system + turns, dropped
