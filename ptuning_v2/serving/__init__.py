"""Serving prefixes: one frozen backbone, many named prefixes, requests for any of them batched together.

``engine`` is the one place that turns a conversation into streamed text; the terminal chat, the web demo and
the OpenAI-compatible server (``api``) all go through it, so they cannot drift apart. ``settings`` parses the
``KEY=VALUE`` settings they share.
"""

from .engine import Completion, Engine, Generation, SamplingParams
from .settings import default_prefixes, parse_prefixes

__all__ = ["Completion", "Engine", "Generation", "SamplingParams", "default_prefixes", "parse_prefixes"]
