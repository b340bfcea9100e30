"""A model replica's outputs kept per input (``cache_entries`` in a deployment's config).

Retrieval pipelines ask the same things again: a query sent to /search twice (a retry, a
second page, a popular question), or the same (query, document) pair reranked by requests
that differ only in fusion, since the top candidates of two fusions mostly overlap. A cached
input is answered without running the model; the rest of a request runs as before, batched.

Keys are 16-byte BLAKE2b digests of everything the output depends on besides the model: the
input itself (a text, a token-id list, a (query, document) pair), the route (task) and the
prompt name. Least recently used entries leave first once ``entries`` are held. A replica's
cache is touched only by its one model thread (deployments.ModelRunner), so it takes no lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any


def input_key(item: Any, task: str | None, prompt_name: str | None) -> bytes:
    """The cache key of one input. ``repr`` tells a text from a token-id list and a pair from two
    texts, and escapes what UTF-8 cannot carry (a lone surrogate), so no two inputs share a key
    short of a 128-bit digest collision."""
    raw = repr((task, prompt_name, item)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).digest()


class OutputCache:
    """At most ``entries`` outputs, each with the tokens the model ran on for it (the usage a
    cached answer reports is the same as when it was computed)."""

    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError(f"cache_entries must be >= 1 for a cache, got {entries}")
        self.entries = entries
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> tuple[Any, int] | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: bytes, output: Any, tokens: int) -> None:
        self._items[key] = (output, tokens)
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)
