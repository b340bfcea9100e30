"""raytrieve.train.cpu_kernels against torch and transformers: the dropout mask's law, its
reproducibility from torch's seed, and attention equal to transformers' own in both modes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from raytrieve.train.cpu_kernels import ATTENTION, MaskDropout, mask_dropout, use_cpu_kernels


def test_mask_drops_at_rate_p_and_keeps_the_expectation():
    n, p = 1_000_000, 0.1
    torch.manual_seed(0)
    y = mask_dropout(torch.ones(n), p)
    dropped = (y == 0).float().mean().item()
    rate = round(p * 65536) / 65536
    assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / n)  # binomial, 5 sigma
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - rate)))
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(rate / (1 - rate) / n)


def test_masks_follow_torchs_generator():
    x = torch.randn(4, 64, 32)
    torch.manual_seed(7)
    first, second = mask_dropout(x, 0.3), mask_dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(mask_dropout(x, 0.3), first)  # a restored seed (or RNG state) replays it
    assert not torch.equal(first, second)  # and each call draws a new mask
    state = torch.get_rng_state()
    again = mask_dropout(x, 0.3)
    torch.set_rng_state(state)
    assert torch.equal(mask_dropout(x, 0.3), again)  # GradCache's RandContext replays this way


def test_gradient_is_the_mask_and_eval_is_identity():
    x = torch.randn(8, 16, requires_grad=True)
    y = mask_dropout(x, 0.5)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 65536 / 32768))
    assert torch.all(x.grad[~kept] == 0)
    module = MaskDropout(0.5).eval()
    assert module(x) is x
    assert torch.equal(mask_dropout(x, 0.0), x)


def _pair(**changes) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ours = BertForSequenceClassification(tiny_bert_config(num_labels=1, **changes))
    reference = BertForSequenceClassification(tiny_bert_config(num_labels=1, **changes))
    reference.load_state_dict(ours.state_dict())
    assert reference.config._attn_implementation == "sdpa"
    ids = torch.randint(1000, 2000, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: the attention mask matters
    mask[2, 4:] = 0
    return ours, reference, {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("bf16", [False, True])
def test_attention_equals_transformers_in_training_and_inference(bf16):
    ours, reference, batch = _pair(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    switched = use_cpu_kernels(ours)
    assert switched["attention"] == 1 and ours.config._attn_implementation == ATTENTION
    for train in (True, False):
        ours.train(train)
        reference.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            got, want = ours(**batch).logits, reference(**batch).logits
        _close(got, want, bf16)
        if train:
            got.sum().backward()
            want.sum().backward()
            for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
                _close(a.grad, b.grad, bf16, name)


def _close(got, want, bf16: bool, name: str = "") -> None:
    """float32: elementwise within 1e-5. bf16 (two kernels round differently): the difference's
    norm within 3% of the reference's, per tensor (an attention bug moves it far more)."""
    if not bf16:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
        return
    assert (got.float() - want.float()).norm() <= 0.03 * want.float().norm() + 1e-6, name


@pytest.mark.parametrize("kind", ["llama-gqa", "t5"])
def test_attention_it_does_not_implement_goes_to_transformers(kind):
    """Fewer key/value heads than query heads (Llama, Qwen) and T5's position bias take
    transformers' SDPA path: equal to the stock model in training, forward and gradients (the
    matrix-product path crashes on the first and drops the bias of the second)."""
    from transformers import LlamaConfig, LlamaModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
        build = T5EncoderModel
    else:
        config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
        build = LlamaModel
    ours, reference = build(config), build(copy.deepcopy(config))  # a shared config would switch both
    reference.load_state_dict(ours.state_dict())
    assert reference.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    switched = use_cpu_kernels(ours)
    assert switched["attention"] == 1 and reference.config._attn_implementation == "sdpa"
    ours.train()
    reference.train()
    got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.sum().backward()
    want.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_model_in_eval_mode_stays_in_eval_mode():
    ours, reference, batch = _pair()
    ours.eval()
    reference.eval()
    use_cpu_kernels(ours)
    assert not any(m.training for m in ours.modules())
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-6, rtol=0)


def test_dropout_is_on_in_training_only_and_the_saved_config_is_transformers():
    ours, reference, batch = _pair(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    assert use_cpu_kernels(ours) == {"dropout": 3 * 2 + 2, "attention": 1}  # 3 per layer, embeddings, head
    assert all(type(m) is not nn.Dropout for m in ours.modules())
    ours.train()
    torch.manual_seed(1)
    a = ours(**batch).logits
    b = ours(**batch).logits
    torch.manual_seed(1)
    assert torch.equal(ours(**batch).logits, a) and not torch.equal(a, b)
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-6, rtol=0)


def test_saved_model_loads_with_transformers_defaults(tmp_path):
    ours, _, batch = _pair()
    use_cpu_kernels(ours)
    ours.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loaded(**batch).logits, ours.eval()(**batch).logits, atol=1e-6, rtol=0)


def test_gradcache_replays_the_masks(tmp_path):
    """CachedMNRL re-runs each chunk's forward from the torch RNG state it saved: with dropout on
    and these kernels it must see the same masks, so with one chunk per column it equals MNRL."""
    from transformers import AutoTokenizer, BertModel

    import raytrieve.losses as L
    from raytrieve import DenseEncoder
    from raytrieve.model_ref import resolve_model
    from raytrieve.modules import Pooling, Transformer

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    BertModel(tiny_bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)).save_pretrained(hf)
    AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")).save_pretrained(hf)
    DenseEncoder([Transformer.from_pretrained(hf, max_seq_length=24), Pooling(32, "mean")], device="cpu").save(
        tmp_path / "m"
    )
    columns = [["how do I sort a list", "capital of germany", "boil an egg", "speed of light"],
               ["sorted(xs) returns a new list", "Berlin", "nine minutes in boiling water", "299,792 km/s"]]
    results = []
    for make in (lambda m: L.MultipleNegativesRankingLoss(m), lambda m: L.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4)):
        model = DenseEncoder(tmp_path / "m", device="cpu").train()
        assert use_cpu_kernels(model)["dropout"] > 0
        torch.manual_seed(3)
        value = make(model)([model.tokenize(c) for c in columns], None)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
