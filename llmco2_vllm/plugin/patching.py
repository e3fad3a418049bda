"""Replacing a vLLM method by the plugin's wrapper, once per process."""

from __future__ import annotations

import functools
from typing import Any, Callable

_MARK = "_llmco2_wrapped"


def wrap_once(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` unless it already is one of ours: ``register()``
    runs in every vLLM process, sometimes more than once, and must never wrap a wrapper."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, name, wrapper)
