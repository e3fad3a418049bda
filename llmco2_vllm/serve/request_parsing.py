"""What a request asks of the engine, read from its OpenAI completions/chat (or estimate) body.

Prompt tokens are counted with the server's tokenizer when it has one, else from characters;
chat templates are approximated (a few tokens per message). No vLLM: the API server's transport
(``plugin/http_endpoints.py``) hands the parsed JSON body in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_TOKEN_COUNT = 10_000_000


class RequestShapeError(ValueError):
    """A request body the forecast cannot read; the message says which field and why."""


@dataclass(frozen=True)
class RequestShape:
    """What the forecast needs of a request."""

    prompt_tokens: int  # per engine request (mean over prompts)
    max_tokens: int
    parts: int  # prompts x n
    prompt_tokens_estimated: bool  # counted from characters: no tokenizer on this server
    runs_to_max_tokens: bool = False  # ignore_eos without stop strings (or min_tokens >= max_tokens): the length is known


def _count_text_tokens(text: str, tokenizer: Any) -> tuple[int, bool]:
    if tokenizer is None:
        return max(1, math.ceil(len(text) / 4)), True  # ~4 characters per token in English BPE vocabularies
    return max(1, len(tokenizer.encode(text))), False


def _whole_number(body: dict[str, Any], name: str, default: int | None, minimum: int = 1) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestShapeError(f"{name} must be a whole number, got {value!r}")
    if not minimum <= value <= MAX_TOKEN_COUNT:
        raise RequestShapeError(f"{name} must be between {minimum} and {MAX_TOKEN_COUNT}, got {value}")
    return value


def request_shape(body: Any, chat: bool, tokenizer: Any, max_model_len: int) -> RequestShape:
    """Prompt tokens, output limit and fan-out of an OpenAI completions/chat body, or of an estimate body.

    Accepts ``prompt`` (text, token ids, or a list of either), ``messages`` (chat), or
    ``prompt_tokens`` (a count); ``max_tokens`` (or ``max_completion_tokens``) and ``n``; and whether
    the request runs to ``max_tokens`` whatever it generates (vLLM's ``ignore_eos`` without ``stop``
    or ``stop_token_ids``, or ``min_tokens`` at least ``max_tokens``).
    """
    if not isinstance(body, dict):
        raise RequestShapeError("the body must be a JSON object")
    estimated = False
    counts: list[int] = []
    if "prompt_tokens" in body:
        counts = [_whole_number(body, "prompt_tokens", None) or 0]
    elif chat or "messages" in body:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestShapeError("messages must be a non-empty list of {role, content} objects")
        total = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else [content]
            for part in parts:
                text = part.get("text", "") if isinstance(part, dict) else part
                if isinstance(text, str) and text:
                    tokens, guessed = _count_text_tokens(text, tokenizer)
                    total += tokens
                    estimated |= guessed
            total += 4  # role and template markers per message (typical chat templates)
        counts = [total]
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise RequestShapeError("prompt must be text, a list of token ids, or a non-empty list of either")
        for item in prompts:
            if isinstance(item, str):
                tokens, guessed = _count_text_tokens(item, tokenizer)
                counts.append(tokens)
                estimated |= guessed
            elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                counts.append(len(item))
            else:
                raise RequestShapeError("each prompt must be text or a non-empty list of token ids")
    else:
        raise RequestShapeError("give prompt (text or token ids), messages, or prompt_tokens")
    prompt_tokens = max(1, round(sum(counts) / len(counts)))
    n = _whole_number(body, "n", 1) or 1
    if n > 1024:
        raise RequestShapeError(f"n must be at most 1024, got {n}")
    max_tokens = _whole_number(body, "max_completion_tokens", None) or _whole_number(body, "max_tokens", None)
    if max_tokens is None:
        # vLLM's defaults: 16 for completions, the rest of the context for chat.
        max_tokens = max(1, max_model_len - prompt_tokens) if chat or "messages" in body else 16
    if prompt_tokens + max_tokens > max_model_len and not estimated:
        raise RequestShapeError(
            f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds the model's context of {max_model_len} tokens"
        )
    min_tokens = body.get("min_tokens")
    runs_to_max_tokens = (body.get("ignore_eos") is True and not body.get("stop") and not body.get("stop_token_ids")) or (
        isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens >= max_tokens
    )
    return RequestShape(prompt_tokens, max_tokens, n * len(counts), estimated, runs_to_max_tokens)


__all__ = ["MAX_TOKEN_COUNT", "RequestShape", "RequestShapeError", "request_shape"]
