"""The weightless input tokenizer gives exactly the ids, padding and prompt lengths of the
full encoder's input module, for every model kind, Router routes and max_seq_length."""

from __future__ import annotations

import pickle

import pytest

from raytrieve.encoders import load_encoder
from raytrieve.encoders.tokenizer_only import load_input_tokenizer
from tests.conftest import SENTENCES


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        g = got[key]
        assert (g.tolist() if hasattr(g, "tolist") else g) == (value.tolist() if hasattr(value, "tolist") else value), key


def _portable(tok):
    """The tokenizer as Ray Data's stages get it: made portable on the driver, pickled over."""
    portable = tok.portable()
    assert portable is not None, "the shipped and tiny models have fast tokenizers"
    return pickle.loads(pickle.dumps(portable))


def _check(kind: str, path, task=None, max_seq_length=None, prompts=(None, "query: ")) -> None:
    encoder = load_encoder(kind, path, max_seq_length=max_seq_length)
    module = encoder.input_module(task)
    tok = load_input_tokenizer(path, task, max_seq_length, kind=kind)
    portable = _portable(tok)
    assert tok.max_seq_length == module.max_seq_length
    for prompt in prompts:
        got = tok.tokenize_ids(SENTENCES, prompt=prompt)
        assert got == module.tokenize_ids(SENTENCES, prompt=prompt)
        assert portable.tokenize_ids(SENTENCES, prompt=prompt) == got  # without transformers
        _same(tok.collate(got), module.collate(got))
        if prompt:
            want_length = module.prompt_length(prompt) if hasattr(module, "prompt_length") else None
            assert tok.prompt_length(prompt) == want_length
        _same(tok.features(SENTENCES, prompt), encoder.tokenize(SENTENCES, task=task, prompt=prompt))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_tiny_models(tiny_models, kind):
    _check(kind, tiny_models[kind])
    _check(kind, tiny_models[kind], max_seq_length=8)


@pytest.mark.parametrize("task", ["query", "document", None])
def test_router_routes(tiny_models, task):
    tok = load_input_tokenizer(tiny_models["router"], task)
    assert tok.route == ("query" if task == "query" else "document")  # default route: document
    _check("sparse", tiny_models["router"], task)
    _check("sparse", tiny_models["router"], task, max_seq_length=6)


def test_cross_encoder_pairs(tiny_models):
    path = tiny_models["cross"]
    module = load_encoder("cross", path).input_module()
    tok = load_input_tokenizer(path, kind="cross")
    pairs = list(zip(SENTENCES, SENTENCES[::-1]))
    assert tok.tokenize_ids(pairs) == module.tokenize_ids(pairs)
    assert "token_type_ids" in tok.tokenize_ids(pairs)
    assert _portable(tok).tokenize_ids(pairs) == tok.tokenize_ids(pairs)
    short = load_input_tokenizer(path, kind="cross", max_seq_length=12)  # truncates both texts, longest first
    assert _portable(short).tokenize_ids(pairs) == short.tokenize_ids(pairs)
    ids = short.tokenize_ids(pairs)
    assert ids == load_encoder("cross", path, max_seq_length=12).input_module().tokenize_ids(pairs)
    from transformers import AutoTokenizer  # the oracle: Hugging Face's own longest-first truncation

    hf = AutoTokenizer.from_pretrained(str(path))([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                                                  max_length=12)
    assert [list(row) for row in ids["input_ids"]] == hf["input_ids"]
    assert max(len(row) for row in hf["input_ids"]) == 12  # the length did cut


@pytest.mark.parametrize("variant", ["splade-tiny", "ms-marco-minilm-l12-v2"])
def test_shipped_models_portable(variant):
    from raytrieve.model_ref import resolve_model

    path = resolve_model(variant)
    for length in (None, 10):
        tok = load_input_tokenizer(path, max_seq_length=length)
        texts = list(zip(SENTENCES, SENTENCES[::-1])) if variant.startswith("ms-marco") else SENTENCES
        for prompt in (None, "query: "):
            assert _portable(tok).tokenize_ids(texts, prompt=prompt) == tok.tokenize_ids(texts, prompt=prompt)


@pytest.mark.parametrize(("kind", "task"), [("dense", None), ("sparse", None), ("cross", None),
                                         ("router", "query"), ("router", "document")])
def test_portable_from_the_loaded_module_is_the_one_loaded_alone(tiny_models, kind, task):
    """The encoding job's driver takes the portable tokenizer from the model it already loaded
    (InputTokenizer.of_module); it must equal the one load_input_tokenizer builds from the folder,
    for Transformer and SparseStaticEmbedding (the Router's query route) inputs and a shortened length."""
    from raytrieve.encoders.tokenizer_only import InputTokenizer

    model_kind = "sparse" if kind == "router" else kind
    for length in (None, 6):
        encoder = load_encoder(model_kind, tiny_models[kind], max_seq_length=length)
        from_module = InputTokenizer.of_module(encoder.input_module(task)).portable()
        alone = load_input_tokenizer(tiny_models[kind], task, length, kind=model_kind).portable()
        assert from_module == alone
        texts = list(zip(SENTENCES, SENTENCES[::-1])) if kind == "cross" else SENTENCES
        assert from_module is not None and alone is not None
        assert from_module.tokenize_ids(texts, prompt="q: ") == alone.tokenize_ids(texts, prompt="q: ")


def test_portable_tokenizer_imports_neither_transformers_nor_torch(minilm_dir):
    import subprocess
    import sys

    data = pickle.dumps(_portable(load_input_tokenizer(minilm_dir)))
    code = ("import pickle, sys; tok = pickle.loads(sys.stdin.buffer.read()); ids = tok.tokenize_ids(['Hello world'])"
            "['input_ids'][0]; print(ids[0], ids[-1], 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True).stdout.decode()
    assert out.split() == ["101", "102", "False", "False"]  # [CLS] ... [SEP]


def test_shipped_minilm(minilm_dir):
    _check("dense", minilm_dir)
    _check("dense", minilm_dir, max_seq_length=16)
    assert load_input_tokenizer(minilm_dir).tokenizer is not None


def test_unknown_route_is_an_input_error(tiny_models):
    from raytrieve.errors import InputError

    with pytest.raises(InputError, match="no route for task 'passage'"):
        load_input_tokenizer(tiny_models["router"], "passage")


def _long_pairs(seed: int, max_length: int) -> list[tuple[str, str]]:
    """Pairs around and far past what ``max_length`` keeps: equal and unequal lengths, runs of
    spaces and newlines, punctuation glued to words, words split into several word pieces."""
    import random

    rng = random.Random(seed)
    words = " ".join(SENTENCES).split() + ["tokenization", "unbelievably", "Zürich", "e-mail,", "(x)", "naïve"]

    def text(n: int) -> str:
        return "".join(rng.choice(words) + rng.choice([" ", " ", "  ", "\n", " \t "]) for _ in range(n)).strip()

    lengths = [max_length // 2, max_length - 3, max_length, max_length + 1, max_length + 2, max_length + 7,
               3 * max_length, 12 * max_length]
    pairs = [(text(a), text(b)) for a in lengths for b in lengths]
    same = text(5 * max_length)
    return [*pairs, (same, same), (same, same + " more"), (same + " more", same)]


@pytest.mark.parametrize("max_length", [33, 34, 256])
def test_long_pairs_are_cut_to_the_ids_the_whole_texts_give(tiny_models, max_length):
    """A fast tokenizer truncating a pair pairs every cut-off piece of one text with every piece
    of the other: two long texts took memory in the product of their lengths (one /rerank body
    of 256 long documents and a long query ran a node out of memory). Pairs of long texts are
    now cut at a word boundary first; the ids must be Hugging Face's own longest-first
    truncation of the whole texts (the oracle), odd and even lengths, equal lengths and ties,
    through transformers and through the portable tokenizer, and the cut must shorten them."""
    from transformers import AutoTokenizer

    from raytrieve.fast_tokenizer import cut_long_pairs
    from raytrieve.model_ref import resolve_model

    tiny = [tiny_models["cross"]] if max_length <= 128 else []  # its position embeddings: 128
    for path in (resolve_model("ms-marco-minilm-l12-v2"), *tiny):
        pairs = _long_pairs(max_length, max_length)
        hf = AutoTokenizer.from_pretrained(str(path))
        want = hf([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length)
        tok = load_input_tokenizer(path, kind="cross", max_seq_length=max_length)
        got = tok.tokenize_ids(pairs)
        assert [list(row) for row in got["input_ids"]] == want["input_ids"]
        assert [list(row) for row in got["token_type_ids"]] == want["token_type_ids"]
        assert _portable(tok).tokenize_ids(pairs) == got
        module = load_encoder("cross", path, max_seq_length=max_length).input_module()
        assert module.tokenize_ids(pairs) == got

        def measure(texts):
            enc = hf(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return list(zip(enc["input_ids"], enc["offset_mapping"]))

        first, second = cut_long_pairs([a for a, _ in pairs], [b for _, b in pairs], measure, max_length)
        long = [i for i, (a, b) in enumerate(pairs) if min(len(a), len(b)) > 10 * max_length]
        assert long and all(len(first[i]) < len(pairs[i][0]) and len(second[i]) < len(pairs[i][1]) for i in long)


def test_a_cut_that_changes_a_texts_ids_leaves_the_pair_whole():
    """The cut is checked: where a cut text's ids are not the whole text's first ones (a
    tokenizer whose last token depends on what follows), the pair is encoded whole."""
    from raytrieve.fast_tokenizer import cut_long_pairs

    def measure(texts):  # one token per word, the last word of a text marked
        out = []
        for text in texts:
            spans, start = [], 0
            for word in text.split(" "):
                spans.append((start, start + len(word)))
                start += len(word) + 1
            ids = [len(word) for word in text.split(" ")]
            out.append((ids[:-1] + [-1], spans))
        return out

    a, b = " ".join(["ab"] * 50), " ".join(["abc"] * 60)
    assert cut_long_pairs([a], [b], measure, 10) == ([a], [b])
    honest = lambda texts: [(ids[:-1] + [len(t.split(" ")[-1])], spans) for (ids, spans), t in  # noqa: E731
                            zip(measure(texts), texts)]
    first, second = cut_long_pairs([a], [b], honest, 10)  # past 10 + 2 tokens, at a space
    assert (first, second) == ([" ".join(["ab"] * 12)], [" ".join(["abc"] * 12)])
    first, second = cut_long_pairs([b], [a], honest, 10)  # the first text longer: it stays the longer
    assert (first, second) == ([" ".join(["abc"] * 13)], [" ".join(["ab"] * 12)])
