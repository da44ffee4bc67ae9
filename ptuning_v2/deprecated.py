"""Public names that the methods reshaping (commit 4290dbf) removed, kept for one release as aliases that warn.

Each alias does what its successor does and raises a ``FutureWarning`` (shown by default, unlike a
``DeprecationWarning``) that names the successor. They live here together so that the next release deletes this
file and the lines that import it (``methods/prefix/method.py``, ``__init__.py``), and nothing else.

| removed name (documented until 4290dbf) | successor |
|---|---|
| ``model.save_prefix(dir)`` (the README's API) | ``model.tuning.save(dir)`` |
| ``prefix_disabled(model)`` (the README's API) | ``model.tuning.bare()`` |
| ``save_prefix_checkpoint(model, dir)`` (exported by ``ptuning_v2``) | ``model.tuning.save(dir)`` |
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

from torch import nn

__all__ = ["add_model_aliases", "prefix_disabled", "save_prefix_checkpoint"]


def _handle(model: nn.Module):
    # The attached method's handle, read as the attribute it is (methods/prefix imports this module, so this module
    # imports nothing of methods).
    handle = getattr(model, "tuning", None)
    if handle is None:
        raise ValueError("this model has no tuning method attached (see ptuning_v2.methods.attach_method)")
    return handle


def _warn(old: str, new: str) -> None:
    # stacklevel 3: the warning points at the caller of the alias, not at the alias.
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", FutureWarning, 3)


def _save_prefix(model: nn.Module, directory: str | Path) -> Path:
    _warn("model.save_prefix(dir)", "model.tuning.save(dir)")
    return _handle(model).save(directory)


def add_model_aliases(model: nn.Module) -> None:
    """Give a prefix-carrying model the methods it had before the reshaping: ``model.save_prefix(dir)``."""
    # A partial, not a bound method: it pickles (a bound method pickles as getattr(model, "_save_prefix")).
    model.save_prefix = functools.partial(_save_prefix, model)


def prefix_disabled(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """``with prefix_disabled(model):`` runs the bare backbone; now ``with model.tuning.bare():``."""
    _warn("prefix_disabled(model)", "model.tuning.bare()")
    return _handle(model).bare()


def save_prefix_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """The prefix only, as ``model.save_prefix(dir)`` wrote it; now ``model.tuning.save(dir)``."""
    _warn("save_prefix_checkpoint(model, dir)", "model.tuning.save(dir)")
    return _handle(model).save(directory)
