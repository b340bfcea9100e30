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

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

TokenIds = dict[str, list[list[int]]]
# (first texts, second texts or None for single texts) -> token ids, truncated, not padded
EncodeBatch = Callable[[list[str], "list[str] | None"], TokenIds]
# texts -> per text, its token ids and their (start, end) characters: no special tokens, whole
MeasureBatch = Callable[[list[str]], "list[tuple[list[int], list[tuple[int, int]]]]"]


def text_token_ids(
    texts: Sequence[Any],
    prompt: str | None,
    encode: EncodeBatch,
    *,
    do_lower_case: bool = False,
    pairs_allowed: bool = True,
    measure: MeasureBatch | None = None,
    max_length: int | None = None,
) -> TokenIds:
    """Token ids per text (or (first, second) pair) from ``encode``, the prompt in front of the
    first text, both texts lower-cased when ``do_lower_case``. ``measure`` and ``max_length``:
    pairs of two long texts are cut first (``cut_long_pairs``), to the same ids."""
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
    if second is not None and measure is not None and max_length is not None:
        first, second = cut_long_pairs(first, second, measure, max_length)
    return encode(first, second)


def cut_long_pairs(
    first: list[str], second: list[str], measure: MeasureBatch, max_length: int
) -> tuple[list[str], list[str]]:
    """Pairs of texts cut at a word boundary past what ``max_length`` keeps, so that encoding
    them with "longest_first" truncation gives the ids the whole texts give.

    Why: a fast tokenizer truncating a pair keeps each text's cut-off tokens as "overflowing"
    pieces and pairs every piece of one with every piece of the other: memory grows with the
    product of the two lengths. Two 6,000-word texts took ~290 MB and 0.5 s a pair, and one
    legal /rerank body (256 such documents) ran a node out of memory.

    Exact: each text keeps its first ``t`` tokens whole (cut where whitespace follows token
    ``t``, t >= max_length + 2), and the cut lengths keep the order of the whole lengths, which
    is all "longest_first" reads of lengths past ``max_length`` (a text at or under it is not
    cut). Each cut text is measured again and its ids must be the whole text's first ``t``;
    a pair where they are not (a tokenizer whose words span whitespace) is left whole."""
    short = max_length // 4  # a pair with a text this short is left whole (a filter, not a rule)
    at = [i for i, (a, b) in enumerate(zip(first, second)) if len(a) > short and len(b) > short]
    if not at:
        return first, second
    cuts: dict[tuple[int, int], tuple[str, list[int]]] = {}  # (side, row) -> (cut text, its ids)
    for i, (ids_a, spans_a), (ids_b, spans_b) in _measured(first, second, at, measure, max_length + 1):
        a, b = first[i], second[i]
        ta, tb = _boundary(a, spans_a, max_length + 2), _boundary(b, spans_b, max_length + 2)
        if len(ids_a) > len(ids_b) and ta <= tb:
            ta = _boundary(a, spans_a, tb + 1)
        elif len(ids_a) <= len(ids_b) and ta > tb:
            tb = _boundary(b, spans_b, ta)
        for side, text, ids, spans, t in ((0, a, ids_a, spans_a, ta), (1, b, ids_b, spans_b, tb)):
            if t < len(ids):
                cuts[side, i] = (text[: spans[t - 1][1]], ids[:t])
    if not cuts:
        return first, second
    distinct = list(dict.fromkeys(text for text, _ in cuts.values()))  # a /rerank body's query: once
    again = dict(zip(distinct, (list(ids) for ids, _ in measure(distinct))))
    wrong = {i for (_, i), (text, ids) in cuts.items() if again[text] != list(ids)}
    first, second = list(first), list(second)
    for (side, i), (text, _) in cuts.items():
        if i not in wrong:
            (first if side == 0 else second)[i] = text
    return first, second


def _measured(first: list[str], second: list[str], rows: list[int], measure: MeasureBatch, fits: int) -> Iterator[Any]:
    """(row, first text's ids and spans, second's) for the ``rows`` whose first text has more than
    ``fits`` tokens: where it has no more, it is not cut, and the second's overflow alone grows
    linearly, so the second is not measured. A few pairs at a time (whole long texts' ids and
    spans take ~230 bytes a token in Python); a first text that repeats (a /rerank body's query)
    is measured once."""
    repeated = {t for t, n in Counter(first[i] for i in rows).items() if n > 1}
    kept: dict[str, Any] = {}
    for start in range(0, len(rows), MEASURED_PAIRS):
        chunk = rows[start : start + MEASURED_PAIRS]
        todo = [t for t in dict.fromkeys(first[i] for i in chunk) if t not in kept]
        got = dict(zip(todo, measure(todo))) if todo else {}
        kept.update((t, got[t]) for t in todo if t in repeated)
        firsts = [kept[first[i]] if first[i] in kept else got[first[i]] for i in chunk]
        long = [(i, m) for i, m in zip(chunk, firsts) if len(m[0]) > fits]
        if long:
            yield from ((i, m, s) for (i, m), s in zip(long, measure([second[i] for i, _ in long])))


MEASURED_PAIRS = 16


def _boundary(text: str, spans: list[tuple[int, int]], t: int) -> int:
    """The least n >= t such that whitespace follows token n (counted from 1) and the next token
    starts after it; the token count when there is none."""
    for n in range(max(t, 1), len(spans)):
        end = spans[n - 1][1]
        if end < len(text) and text[end].isspace() and spans[n][0] > end:
            return n
    return len(spans)


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
    _whole: Any = field(default=None, init=False, repr=False, compare=False)  # not truncating

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_backend", "_whole")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _backend=None, _whole=None)

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
            measure=self._measure if self.truncation_side == "right" else None,
            max_length=self.max_seq_length,
        )

    def _measure(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if self._whole is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.backend_json)
            tok.no_truncation()
            tok.no_padding()
            tok.encode_special_tokens = self.split_special_tokens
            self._whole = tok
        return [(e.ids, e.offsets) for e in self._whole.encode_batch(texts, add_special_tokens=False)]

    def _encode(self, first: list[str], second: list[str] | None) -> TokenIds:
        inputs: list[Any] = list(zip(first, second)) if second is not None else first
        encodings = self.backend().encode_batch(inputs, add_special_tokens=not self.static)
        out = {"input_ids": [e.ids for e in encodings]}
        if self.accepts_token_types and not self.static:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return out
