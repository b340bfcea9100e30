"""An input module's tokenization as the ``tokenizers`` library's own object: no transformers,
no torch in the process that tokenizes.

Ray Data's tokenizing tasks and actors (training's read tasks, the encoding job's
ReadAndTokenize) are short-lived processes. Loading the tokenizer through transformers cost
each of them ~3.5 CPU seconds of imports (transformers pulls in torch), more than tokenizing a
shard; ``import tokenizers`` costs 0.02 s. So the driver loads the tokenizer once the usual way
(encoders/tokenizer_only.py), and ``InputTokenizer.portable()`` captures the fast tokenizer's
backend exactly as transformers configured it (``backend_tokenizer.to_str()``: normalizer,
pre-tokenizer, special-token template, added tokens) with the module's settings. Tokenizing
then runs the same ``encode_batch`` transformers' fast tokenizers call, with the same
truncation, so the ids are the same (tests/test_tokenizer_only.py checks it on the shipped
models). Slow (Python) tokenizers have no backend: their stages load them as before.

``text_token_ids`` is the one place that turns a batch of texts or text pairs into what a
tokenizer encodes (pair checks, prompt, lower-casing); modules/transformer.py calls it with
transformers' tokenizer, ``PortableTokenizer`` with the backend, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TokenIds = dict[str, list[list[int]]]
# (first texts, second texts or None for single texts) -> token ids, truncated, not padded
EncodeBatch = Callable[[list[str], "list[str] | None"], TokenIds]


def text_token_ids(
    texts: Sequence[Any],
    prompt: str | None,
    encode: EncodeBatch,
    *,
    do_lower_case: bool = False,
    pairs_allowed: bool = True,
) -> TokenIds:
    """Token ids per text (or (first, second) pair) from ``encode``, the prompt in front of the
    first text, both texts lower-cased when ``do_lower_case``."""
    if not len(texts):
        return {"input_ids": []}
    first: list[str]
    second: list[str] | None
    if isinstance(texts[0], str):
        # A batch is all single texts or all pairs; its first element tells which.
        first, second = list(texts), None
    else:
        if not pairs_allowed or any(len(t) != 2 for t in texts):
            from raytrieve.errors import InputError

            raise InputError("text pairs must be (first, second) tuples of two strings")
        first, second = [t[0] for t in texts], [t[1] for t in texts]
    if prompt:
        first = [prompt + t for t in first]
    if do_lower_case:
        first = [t.lower() for t in first]
        second = [t.lower() for t in second] if second is not None else None
    return encode(first, second)


@dataclass
class PortableTokenizer:
    """Picklable token-id maker for one input module (``InputTokenizer.tokenize_ids`` without
    the weights' libraries). ``static``: SparseStaticEmbedding's rule (no special tokens, no
    token types, the prompt not marked)."""

    backend_json: str
    max_seq_length: int
    static: bool = False
    do_lower_case: bool = False
    accepts_token_types: bool = False
    truncation_side: str = "right"
    split_special_tokens: bool = False
    _backend: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_backend"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _backend=None)

    def backend(self) -> Any:
        if self._backend is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.backend_json)
            # What transformers' fast tokenizers set before every call with truncation=True /
            # "longest_first" and max_length, and no padding.
            tok.enable_truncation(self.max_seq_length, strategy="longest_first", direction=self.truncation_side)
            tok.no_padding()
            tok.encode_special_tokens = self.split_special_tokens
            self._backend = tok
        return self._backend

    def tokenize_ids(self, texts: Sequence[Any], prompt: str | None = None) -> TokenIds:
        """Token ids per text (or (first, second) pair), the prompt in front of the first text,
        truncated to max_seq_length, not padded."""
        return text_token_ids(
            texts,
            prompt,
            self._encode,
            do_lower_case=self.do_lower_case and not self.static,
            pairs_allowed=not self.static,
        )

    def _encode(self, first: list[str], second: list[str] | None) -> TokenIds:
        inputs: list[Any] = list(zip(first, second)) if second is not None else first
        encodings = self.backend().encode_batch(inputs, add_special_tokens=not self.static)
        out = {"input_ids": [e.ids for e in encodings]}
        if self.accepts_token_types and not self.static:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return out
