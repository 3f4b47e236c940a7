"""A tokenizer that one thread at a time may use.

The diffusers adapter runs each request's pipeline `__call__` on its own thread, and the
requests' pipeline copies share the loaded tokenizers. A fast tokenizer keeps its padding and
truncation settings on the shared Rust object and sets them on every call, so two threads
encoding at once can each get the other's settings: diffusers' pipelines call the same tokenizer
with `padding="max_length"` and, to warn about truncation, with `padding="longest"`, and a
prompt then came back 29 tokens long instead of 77 (a shape error, or a wrong image).
"""

from __future__ import annotations

import threading
from typing import Any


class SerializedTokenizer:
    """Stands in for a tokenizer: every call, and every method call, holds its lock."""

    def __init__(self, tokenizer: Any, lock: threading.Lock):
        self._tokenizer = tokenizer
        self._lock = lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value
        lock = self._lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return value(*args, **kwargs)

        return locked


def is_tokenizer(value: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(value, PreTrainedTokenizerBase)
