"""A replica's output cache (serve/cache.py, ``cache_entries``): a cached input answers what the
model answers for it uncached, only the inputs the cache lacks run the model, the least
recently used leave first, and inputs that differ in route, prompt or shape never share a key.
The oracle is the same replica without a cache. No Ray: ``ModelRunner`` is what a replica runs."""

from __future__ import annotations

import numpy as np
import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.serve.cache import OutputCache, input_key
from raytrieve.serve.config import DeploymentConfig, ServeConfig
from raytrieve.serve.deployments import ModelRunner

PAIRS = [
    ("inverse of a matrix", "Compute the (multiplicative) inverse of a matrix."),
    ("inverse of a matrix", "Return the sum of the array elements over a given axis."),
    ("sort an array", "Return a sorted copy of an array."),
    ("sort an array", "Compute the (multiplicative) inverse of a matrix."),
]


def _runner(kind: str, folder, cache_entries: int) -> ModelRunner:
    spec = DeploymentConfig(model=str(folder), dtype="float32", torch_threads=1, cache_entries=cache_entries)
    return ModelRunner(kind, spec)


def _computed(runner: ModelRunner) -> list[list]:
    """Every batch the runner's model is asked to run from now on."""
    calls: list[list] = []
    compute = runner._compute

    def counting(inputs, task, prompt_name):
        calls.append(list(inputs))
        return compute(inputs, task, prompt_name)

    runner._compute = counting  # type: ignore[method-assign]
    return calls


def test_a_cached_reranker_scores_as_uncached_and_runs_only_the_pairs_it_lacks(tiny_dirs):
    plain = _runner("reranker", tiny_dirs["cls1_spread"], 0)
    cached = _runner("reranker", tiny_dirs["cls1_spread"], 3)
    calls = _computed(cached)
    want, want_tokens = plain._run(PAIRS, None, None)
    assert len(set(np.round(want, 4))) == 4, "the oracle must tell the pairs apart"

    # Pair 0 twice in one request: it runs once.
    got, tokens = cached._run([PAIRS[0], PAIRS[1], PAIRS[0]], None, None)
    assert calls == [[PAIRS[0], PAIRS[1]]]
    np.testing.assert_allclose(got, want[[0, 1, 0]], rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32 and tokens == [want_tokens[i] for i in (0, 1, 0)]

    # Another fusion's candidates: pair 1 again, pairs 2 and 3 new; the cache (3 entries) then
    # holds 1, 2, 3, and pair 0, least recently used, has left.
    got, tokens = cached._run([PAIRS[2], PAIRS[1], PAIRS[3]], None, None)
    assert calls[1:] == [[PAIRS[2], PAIRS[3]]]
    np.testing.assert_allclose(got, want[[2, 1, 3]], rtol=1e-5, atol=1e-6)
    assert tokens == [want_tokens[i] for i in (2, 1, 3)]
    got, _ = cached._run([PAIRS[3], PAIRS[0]], None, None)
    assert calls[2:] == [[PAIRS[0]]]
    np.testing.assert_allclose(got, want[[3, 0]], rtol=1e-5, atol=1e-6)

    # Logits (task "logits", TEI's raw_scores) are another output of the same pair.
    logits, _ = cached._run([PAIRS[0]], "logits", None)
    assert calls[3:] == [[PAIRS[0]]]
    np.testing.assert_allclose(logits, plain._run([PAIRS[0]], "logits", None)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, want[[0]])
    assert len(cached._cache or ()) == 3 and cached.describe()["cache_entries"] == 3


def test_cached_dense_and_sparse_outputs_keep_their_shapes_and_values(tiny_dirs):
    texts = ["inverse of a matrix", "sort an array", "the sum over an axis"]
    for kind, folder in (("dense", tiny_dirs["base"]), ("sparse", tiny_dirs["mlm"])):
        want, want_tokens = _runner(kind, folder, 0)._run(texts, "query", None)
        cached = _runner(kind, folder, 8)
        calls = _computed(cached)
        cached._run(texts[:2], "query", None)
        got, tokens = cached._run(texts, "query", None)  # two from the cache, one computed
        assert calls == [texts[:2], texts[2:]] and tokens == want_tokens
        if kind == "dense":
            assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert len(got) == len(want)
            for (indices, values), (want_indices, want_values) in zip(got, want):
                np.testing.assert_array_equal(indices, want_indices)
                np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-6)
        # All cached: the same shape as computed, and the model does not run.
        again, _ = cached._run(texts, "query", None)
        assert len(calls) == 2
        if kind == "dense":
            assert again.shape == want.shape


def test_inputs_that_differ_in_route_prompt_or_shape_never_share_a_key():
    keys = [
        input_key("a b", "query", None),
        input_key("a b", "document", None),
        input_key("a b", None, None),
        input_key("a b", "query", "query"),
        input_key(("a", "b"), None, None),
        input_key("('a', 'b')", None, None),
        input_key([101, 102], None, None),
        input_key("[101, 102]", None, None),
        input_key("\ud800", None, None),  # a lone surrogate: still a key, its own
        input_key("\\ud800", None, None),
    ]
    assert len(set(keys)) == len(keys)
    assert input_key(("a", "b"), None, None) == input_key(("a", "b"), None, None)
    # Least recently used out first: a read keeps the oldest entry, the next-oldest leaves.
    cache = OutputCache(2)
    cache.put(keys[0], 0, 1)
    cache.put(keys[1], 1, 1)
    assert cache.get(keys[0]) == (0, 1)
    cache.put(keys[2], 2, 1)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == (0, 1) and cache.get(keys[2]) == (2, 1)
    assert len(cache) == 2


def test_cache_entries_below_zero_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"reranker.*cache_entries"):
        from_dict(ServeConfig, {"reranker": {"model": "ms-marco-minilm-l12-v2", "cache_entries": -1}}, where="s.yaml")


def test_tokenizer_calls_run_on_the_model_thread(tiny_dirs):
    """/tokenize and /embed_sparse's tokens use the model's tokenizer on the replica's one model
    thread, never beside a batch's tokenization there (a fast tokenizer used from two threads at
    once fails with "Already borrowed"), and answer as the tokenizer does."""
    import asyncio
    import threading

    runner = _runner("sparse", tiny_dirs["mlm"], 0)
    seen: list[str] = []
    tokenizer = runner.model.tokenizer
    convert = tokenizer.convert_ids_to_tokens

    def recording(ids):
        seen.append(threading.current_thread().name)
        return convert(ids)

    tokenizer.convert_ids_to_tokens = recording  # type: ignore[method-assign]

    async def main():
        return await asyncio.gather(
            runner.tokenize(["inverse of a matrix"], True, None),
            runner.tokens([2000, 2001]),
            runner._in_model_thread(["sort an array"], "query", None),
        )

    rows, tokens, _ = asyncio.run(main())
    assert [t["text"] for t in rows[0]] == ["[CLS]", "inverse", "of", "a", "matrix", "[SEP]"]
    assert tokens == convert([2000, 2001])
    assert seen and all(name.startswith("model") for name in seen), seen
