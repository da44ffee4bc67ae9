"""The one place that knows what the key/value cache is called in the installed transformers.

transformers 5.24 renamed the models' ``past_key_values`` argument (and output field) to ``cache``; the old name is
a deprecated alias until 5.40. Everything else in the package asks here instead of checking versions, so both APIs
work and our own calls raise no deprecation warning on either.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes its key/value cache, or None when it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), None)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from forward keywords, under whichever name the caller used."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache as either `cache` or `past_key_values`, not both")
    values = [kwargs.pop(name, None) for name in CACHE_NAMES]
    return next((value for value in values if value is not None), None)


def output_cache(outputs: Any) -> Any:
    """The cache a forward returned (``outputs.cache`` from 5.24 on, ``outputs.past_key_values`` before)."""
    for name in CACHE_NAMES:
        if name in getattr(outputs, "__dataclass_fields__", {}):
            return getattr(outputs, name)
    return None


def forward_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Fold positional arguments into keywords, so the hook sees ``input_ids`` however it was passed."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    merged: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            merged.update(value)
        else:
            merged[name] = value
    return merged
