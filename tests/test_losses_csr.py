"""CSR (a dense model topped by a SparseAutoEncoder) against sentence-transformers: the module's
training outputs and dead-latent statistics, its folder in both directions, and CSRLoss's
components and gradients on identical weights and inputs."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_losses_dense import ANCHORS, NEGATIVES, POSITIVES, SCORES, _build

import raytrieve.losses.sparse as SL
from raytrieve import SparseEncoder
from raytrieve.errors import ConfigError, DimensionMismatchError
from raytrieve.modules import Pooling, SparseAutoEncoder, Transformer

COLS3 = [ANCHORS, POSITIVES, NEGATIVES]
# Every tensor the module adds for training (auxiliary ones included).
TRAIN_KEYS = [
    "sentence_embedding",
    "sentence_embedding_backbone",
    "sentence_embedding_encoded",
    "sentence_embedding_encoded_4k",
    "auxiliary_embedding",
    "decoded_embedding_k",
    "decoded_embedding_4k",
    "decoded_embedding_aux",
    "decoded_embedding_k_pre_bias",
]


@pytest.fixture(scope="module")
def csr_dirs(tmp_path_factory):
    """Tiny CSR models (no dropout): Transformer -> mean Pooling -> SparseAutoEncoder(32 -> 64, k=4),
    with non-zero biases and a dead-latent clock where some latents are dead (> 30 steps), so
    the auxiliary reconstruction has work to do."""
    root = tmp_path_factory.mktemp("csr")
    _build(root, "base", seed=0)
    dirs = {}
    for normalize in (False, True):
        torch.manual_seed(1)
        sae = SparseAutoEncoder(32, hidden_dim=64, k=4, k_aux=16, normalize=normalize)
        with torch.no_grad():
            sae.pre_bias.normal_(0, 0.1)
            sae.latent_bias.normal_(0, 0.1)
            sae.stats_last_nonzero.copy_(torch.randint(0, 60, (64,)))
        transformer = Transformer.from_pretrained(root / "base_hf", max_seq_length=24)
        dirs[normalize] = root / f"csr_{normalize}"
        SparseEncoder([transformer, Pooling(32, "mean"), sae], device="cpu").save(dirs[normalize])
    return dirs


def _pair(st, path):
    return SparseEncoder(path, device="cpu").train(), st.SparseEncoder(str(path), device="cpu").train()


@pytest.mark.parametrize("normalize", [False, True])
def test_autoencoder_outputs_match(st, csr_dirs, normalize):
    ours, ref = _pair(st, csr_dirs[normalize])
    got = ours(ours.tokenize(ANCHORS))
    want = ref(ref.preprocess(ANCHORS))
    for key in TRAIN_KEYS:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    assert int((got["sentence_embedding"] != 0).sum(dim=1).max()) <= 4
    assert torch.count_nonzero(got["auxiliary_embedding"]) > 0  # dead latents took part
    torch.testing.assert_close(ours.stack[2].stats_last_nonzero, ref[2].stats_last_nonzero)
    # Encoding: the top-k code only, no statistics kept.
    before = ours.stack[2].stats_last_nonzero.clone()
    texts = ANCHORS + POSITIVES
    encoded = ours.encode(texts, convert_to_sparse_tensor=False)
    torch.testing.assert_close(encoded, ref.encode(texts, convert_to_sparse_tensor=False), atol=1e-5, rtol=1e-4)
    assert torch.equal(ours.stack[2].stats_last_nonzero, before)


def test_folder_written_by_sentence_transformers_loads(st, csr_dirs, tmp_path):
    ref = st.SparseEncoder(str(csr_dirs[True]), device="cpu")
    ref.save(str(tmp_path / "st"))
    entries = json.loads((tmp_path / "st" / "modules.json").read_text())
    assert entries[-1]["type"].endswith("sparse_auto_encoder.SparseAutoEncoder")
    ours = SparseEncoder(tmp_path / "st", device="cpu")
    sae = ours.stack[2]
    assert sae.config_dict() == {
        "input_dim": 32,
        "hidden_dim": 64,
        "k": 4,
        "k_aux": 16,
        "normalize": True,
        "dead_threshold": 30,
    }
    assert ours.get_embedding_dimension() == 64
    torch.testing.assert_close(sae.encoder.weight, ref[2].encoder.weight)
    torch.testing.assert_close(sae.stats_last_nonzero, ref[2].stats_last_nonzero)
    texts = ANCHORS + NEGATIVES
    torch.testing.assert_close(
        ours.encode(texts, convert_to_sparse_tensor=False),
        ref.encode(texts, convert_to_sparse_tensor=False),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "normalize,base", [(False, None), (True, None), (False, "SparseCoSENTLoss"), (False, "SparseMarginMSELoss")]
)
def test_csr_loss_components_and_gradients(st, csr_dirs, normalize, base):
    from sentence_transformers.sparse_encoder import losses as SS

    ours_model, ref_model = _pair(st, csr_dirs[normalize])
    cols, labels = {
        None: (COLS3, None),
        "SparseCoSENTLoss": (COLS3[:2], SCORES),
        "SparseMarginMSELoss": (COLS3, torch.tensor([1.0, 0.5, 2.0, -0.5, 0.0, 3.0])),
    }[base]
    ours_base = getattr(SL, base)(ours_model) if base else None
    ref_base = getattr(SS, base)(ref_model) if base else None
    ours = SL.CSRLoss(ours_model, ours_base, beta=0.5, gamma=2.0)
    ref = SS.CSRLoss(ref_model, ref_base, beta=0.5, gamma=2.0)
    got = ours([ours_model.tokenize(c) for c in cols], labels)
    want = ref([ref_model.preprocess(c) for c in cols], labels)
    assert (
        list(got)
        == list(want)
        == ["reconstruction_loss_k", "reconstruction_loss_4k", "reconstruction_loss_aux", "base_loss"]
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    sum(got.values()).backward()
    sum(want.values()).backward()
    ours_p, ref_p = dict(ours_model.named_parameters()), list(ref_model.parameters())
    assert len(ours_p) == len(ref_p)
    for (name, a), b in zip(ours_p.items(), ref_p):
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    for name in ("stack.2.pre_bias", "stack.2.encoder.weight", "stack.2.latent_bias"):
        assert ours_p[name].grad.abs().sum() > 0, name
    # One forward per column, as sentence-transformers: the dead-latent clocks agree.
    torch.testing.assert_close(ours_model.stack[2].stats_last_nonzero, ref_model[2].stats_last_nonzero)


def test_csr_errors(st, csr_dirs, tiny_dirs):
    model = SparseEncoder(csr_dirs[False], device="cpu")
    with pytest.raises(ConfigError, match="SparseAutoEncoder module"):
        SL.CSRLoss(SparseEncoder(tiny_dirs["mlm"], device="cpu"))
    with pytest.raises(ConfigError, match=r"k=65 exceeds hidden_dim=64"):
        SparseAutoEncoder(32, hidden_dim=64, k=65)
    with pytest.raises(ConfigError, match=r"4 x k=20 exceeds hidden_dim=64"):
        SparseAutoEncoder(32, hidden_dim=64, k=20, k_aux=8).train()({"sentence_embedding": torch.randn(2, 32)})
    with pytest.raises(DimensionMismatchError, match="fix input_dim"):
        model.stack[2]({"sentence_embedding": torch.randn(2, 16)})
    with torch.inference_mode():  # encoding-only settings (4k > hidden) still encode
        out = SparseAutoEncoder(32, hidden_dim=64, k=20, k_aux=8)({"sentence_embedding": torch.randn(2, 32)})
    assert out["sentence_embedding"].shape == (2, 64)
