"""Progress lines of ``llmco2 collect``: to stderr unless a stream is given (tests pass one)."""

from __future__ import annotations

import sys
from typing import TextIO


def progress(stream: TextIO | None, text: str) -> None:
    print(f"[llmco2 collect] {text}", file=stream or sys.stderr, flush=True)
