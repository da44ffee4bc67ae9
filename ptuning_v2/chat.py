"""``python -m ptuning_v2.chat``: the terminal chat, a front end of the serving engine (``serving/chat.py``)."""

from .serving.chat import cli, main, parse_args

__all__ = ["cli", "main", "parse_args"]

if __name__ == "__main__":
    cli()
