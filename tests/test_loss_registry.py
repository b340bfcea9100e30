"""Losses built from config specs, with errors that name the key and the choices."""

from __future__ import annotations

import inspect

import pytest

from raytrieve import DenseEncoder, SparseEncoder
from raytrieve.errors import ConfigError
from raytrieve.losses import (
    AdaptiveLayerLoss,
    CoSENTLoss,
    Matryoshka2dLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
    TripletLoss,
)
from raytrieve.losses.registry import build_loss, loss_names, needs_labels, text_columns
from raytrieve.train.config import LossSpec
from raytrieve.losses.sparse import SpladeLoss
from raytrieve.modules import Pooling, Transformer


@pytest.fixture(scope="module")
def dense(tiny_dirs):
    t = Transformer.from_pretrained(tiny_dirs["base"])
    return DenseEncoder([t, Pooling(32)], device="cpu")


def test_catalogue_covers_the_three_kinds():
    assert {"MultipleNegativesRankingLoss", "CachedGISTEmbedLoss", "MatryoshkaLoss", "CoSENTLoss"} <= set(
        loss_names("dense")
    )
    assert {"SpladeLoss", "SparseMultipleNegativesRankingLoss"} <= set(loss_names("sparse"))
    assert {"LambdaLoss", "BinaryCrossEntropyLoss", "ListNetLoss"} <= set(loss_names("cross"))


def test_build_dense_with_matryoshka(dense):
    loss = build_loss(
        LossSpec("MultipleNegativesRankingLoss", {"scale": 10.0, "similarity_fct": "dot"}, matryoshka_dims=[32, 16]),
        dense,
        "dense",
    )
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, MultipleNegativesRankingLoss)
    assert loss.loss.scale == 10.0 and loss.matryoshka_dims == (32, 16)
    assert not needs_labels(LossSpec("MultipleNegativesRankingLoss"))
    assert needs_labels(LossSpec("CoSENTLoss")) and text_columns(LossSpec("TripletLoss"), "dense") == (3, 3)


def test_build_splade(tiny_dirs):
    model = SparseEncoder(tiny_dirs["mlm"], device="cpu")
    spec = LossSpec(
        "SpladeLoss",
        {"document_regularizer_weight": 3e-5, "query_regularizer_weight": 5e-5},
        inner=LossSpec("SparseMultipleNegativesRankingLoss"),
    )
    assert isinstance(build_loss(spec, model, "sparse"), SpladeLoss)
    assert text_columns(spec, "sparse") == (2, None)


def test_errors_name_the_problem(dense):
    with pytest.raises(ConfigError, match=r"unknown dense loss 'MNRL'; choose from \["):
        build_loss(LossSpec("MNRL"), dense, "dense")
    with pytest.raises(ConfigError, match=r"loss.args: unknown argument\(s\) \['temperatur'\]"):
        build_loss(LossSpec("MultipleNegativesRankingLoss", {"temperatur": 0.05}), dense, "dense")
    with pytest.raises(ConfigError, match="SpladeLoss needs a base loss"):
        build_loss(LossSpec("SpladeLoss", {"document_regularizer_weight": 1e-3}), dense, "sparse")


MATRYOSHKA_YAML = """
name: MatryoshkaLoss
args:
  matryoshka_dims: [32, 16, 8]
  n_dims_per_step: 2
inner:
  name: MultipleNegativesRankingLoss
  args: {scale: 10.0}
"""


def _spec(data) -> LossSpec:
    import yaml

    from raytrieve.config import from_dict

    return from_dict(LossSpec, yaml.safe_load(data) if isinstance(data, str) else data, "loss")


def test_build_modifiers_from_config(dense):
    loss = build_loss(_spec(MATRYOSHKA_YAML), dense, "dense")
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, MultipleNegativesRankingLoss)
    assert loss.matryoshka_dims == (32, 16, 8) and loss.n_dims_per_step == 2 and loss.loss.scale == 10.0
    # sentence-transformers' argument name for the wrapped loss reads the same.
    same = {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [32, 16], "loss": {"name": "CoSENTLoss"}}}
    assert isinstance(build_loss(_spec(same), dense, "dense").loss, CoSENTLoss)
    same["args"]["loss"] = "CoSENTLoss"  # a name alone, as a dataset's loss may be (it was refused)
    assert isinstance(build_loss(_spec(same), dense, "dense").loss, CoSENTLoss)
    two_d = {
        "name": "Matryoshka2dLoss",
        "args": {"matryoshka_dims": [32, 16], "n_layers_per_step": 2},
        "inner": {"name": "CoSENTLoss"},
    }
    loss = build_loss(_spec(two_d), dense, "dense")
    assert isinstance(loss, Matryoshka2dLoss) and isinstance(loss.loss, MatryoshkaLoss)
    assert loss.n_layers_per_step == 2 and isinstance(loss.loss.loss, CoSENTLoss)
    adaptive = {
        "name": "AdaptiveLayerLoss",
        "args": {"layer_weighting": "log"},
        "inner": {"name": "CachedMultipleNegativesRankingLoss", "args": {"mini_batch_size": 4}},
    }
    with pytest.raises(ConfigError, match=r"^loss: AdaptiveLayerLoss cannot wrap a GradCache"):
        build_loss(_spec(adaptive), dense, "dense")
    adaptive["inner"] = {"name": "TripletLoss"}
    loss = build_loss(_spec(adaptive), dense, "dense")
    assert isinstance(loss, AdaptiveLayerLoss) and loss.layer_weighting == "log" and isinstance(loss.loss, TripletLoss)
    # What the data must hold comes from the innermost loss.
    assert needs_labels(_spec(two_d)) and not needs_labels(_spec(MATRYOSHKA_YAML))
    assert text_columns(_spec(adaptive), "dense") == (3, 3) and text_columns(_spec(same), "dense") == (2, 2)
    assert _spec(two_d).base.name == "CoSENTLoss"


def test_build_csr(tiny_dirs):
    from raytrieve.losses.sparse import CSRLoss, SparseCoSENTLoss, SparseMultipleNegativesRankingLoss
    from raytrieve.modules import SparseAutoEncoder

    model = SparseEncoder(
        [
            Transformer.from_pretrained(tiny_dirs["base"]),
            Pooling(32),
            SparseAutoEncoder(32, hidden_dim=64, k=4, k_aux=8),
        ],
        device="cpu",
    )
    loss = build_loss(LossSpec("CSRLoss", {"beta": 0.2}), model, "sparse")
    assert isinstance(loss, CSRLoss) and isinstance(loss.loss, SparseMultipleNegativesRankingLoss)
    assert loss.beta == 0.2 and text_columns(LossSpec("CSRLoss"), "sparse") == (2, None)
    spec = LossSpec("CSRLoss", inner=LossSpec("SparseCoSENTLoss"))
    assert isinstance(build_loss(spec, model, "sparse").loss, SparseCoSENTLoss) and needs_labels(spec)
    assert "CSRReconstructionLoss" not in loss_names("sparse")


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [16]}, "inner": {"name": "MNRLoss"}},
            r"^loss\.inner\.name: unknown dense loss 'MNRLoss'; choose from \[.*'MultipleNegativesRankingLoss'",
        ),
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [16], "loss": {"name": "MNRLoss"}}},
            r"^loss\.args\.loss\.name: unknown dense loss 'MNRLoss'",
        ),
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [16], "loss": {"nam": "CoSENTLoss"}}},
            r"^loss\.args\.loss: unknown key\(s\) \['nam'\]",
        ),
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [16]}},
            r"^loss\.inner: MatryoshkaLoss needs a base loss, e.g. inner: \{name: MultipleNegativesRankingLoss",
        ),
        (
            {"name": "MatryoshkaLoss", "inner": {"name": "CoSENTLoss"}},
            r"^loss\.args\.matryoshka_dims is required for MatryoshkaLoss \(e\.g\. \[768, 512",
        ),
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [64]}, "inner": {"name": "CoSENTLoss"}},
            r"^loss: MatryoshkaLoss: matryoshka_dims \[64\] go beyond the model's 32-d embedding; use sizes up to 32",
        ),
        (
            {
                "name": "Matryoshka2dLoss",
                "args": {"matryoshka_dims": [16]},
                "inner": {"name": "CoSENTLoss"},
                "matryoshka_dims": [16],
            },
            r"^loss\.matryoshka_dims would wrap Matryoshka2dLoss in a second",
        ),
        (
            {
                "name": "MatryoshkaLoss",
                "args": {"matryoshka_dims": [16], "loss": {"name": "CoSENTLoss"}},
                "inner": {"name": "CoSENTLoss"},
            },
            r"^loss: give the base loss of MatryoshkaLoss once",
        ),
        (
            {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [16], "loss": 3}},
            r"^loss\.args\.loss: expected a loss spec such as \{name: MultipleNegativesRankingLoss",
        ),
        (
            {"name": "CoSENTLoss", "inner": {"name": "CoSENTLoss"}},
            r"^loss\.inner: CoSENTLoss wraps no other loss; only \[.*'MatryoshkaLoss'",
        ),
        (
            {"name": "AdaptiveLayerLoss", "args": {"n_layer_per_step": 2}, "inner": {"name": "CoSENTLoss"}},
            r"^loss\.args: unknown argument\(s\) \['n_layer_per_step'\] for AdaptiveLayerLoss",
        ),
    ],
)
def test_modifier_config_errors_name_the_field(dense, data, message):
    with pytest.raises(ConfigError, match=message):
        build_loss(_spec(data), dense, "dense")


def test_a_new_loss_is_one_class_and_its_registration(dense, tmp_path):
    """Adding a loss: one class stating what differs from LossContract's defaults, registered for
    its kind. A config naming it (here as a MatryoshkaLoss's base) then passes the dataset checks
    by its contract, builds and runs; unregistering leaves the registry as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raytrieve.config import from_dict
    from raytrieve.data.validate import validate_dataset
    from raytrieve.errors import DataError
    from raytrieve.losses import Loss
    from raytrieve.losses.base import register, unregister
    from raytrieve.train.config import DatasetConfig

    before = {kind: loss_names(kind) for kind in ("dense", "sparse", "cross")}

    @register("dense")
    class ScoredPairLoss(Loss):
        columns = (2, 2)
        column_names = "sentence1, sentence2 (+ a score label)"
        needs_labels = True

        def __init__(self, model, offset: float = 0.0) -> None:
            super().__init__(model)
            self.offset = offset

        def compute_loss_from_embeddings(self, embeddings, labels):
            scores = (embeddings[0] * embeddings[1]).sum(-1) + self.offset
            return (scores - labels.to(scores.dtype)).square().mean()

    try:
        assert "ScoredPairLoss" in loss_names("dense") and "ScoredPairLoss" not in loss_names("sparse")
        pq.write_table(pa.table({"a": ["x", "y"], "b": ["u", "v"], "score": [0.1, 0.9]}), tmp_path / "pairs.parquet")
        loss = {"name": "MatryoshkaLoss", "args": {"matryoshka_dims": [32, 16]},
                "inner": {"name": "ScoredPairLoss", "args": {"offset": 0.5}}}
        d = from_dict(DatasetConfig, {"name": "pairs", "path": str(tmp_path / "pairs.parquet"), "columns": ["a", "b"],
                                      "label_column": "score", "loss": loss}, "datasets[0]")
        report = validate_dataset(d, "dense", "datasets[0]")
        assert report.rows == 2 and report.text_columns == ["a", "b"] and report.label_column == "score"
        built = build_loss(d.loss, dense, "dense")
        assert isinstance(built, MatryoshkaLoss) and isinstance(built.loss, ScoredPairLoss) and built.loss.offset == 0.5
        value = built([dense.tokenize(["x", "y"]), dense.tokenize(["u", "v"])], torch.tensor([0.1, 0.9]))
        assert torch.isfinite(value)
        # Its contract is what the checks enforce: labels, then the column count.
        d.label_column = None
        with pytest.raises(DataError, match=r"ScoredPairLoss needs labels; set datasets\[\]\.label_column"):
            validate_dataset(d, "dense", "datasets[0]")
        d.label_column, d.columns = "score", ["a"]
        with pytest.raises(DataError, match="ScoredPairLoss takes 2 text column"):
            validate_dataset(d, "dense", "datasets[0]")
    finally:
        unregister("dense", "ScoredPairLoss")
    assert {kind: loss_names(kind) for kind in before} == before
    with pytest.raises(ConfigError, match="unknown dense loss 'ScoredPairLoss'"):
        build_loss(LossSpec("ScoredPairLoss"), dense, "dense")


def test_registration_refuses_a_loss_configs_could_not_use():
    from raytrieve.losses import Loss
    from raytrieve.losses.base import register

    before = loss_names("dense")

    class WrapsALoss(Loss):  # takes a base loss, but configs could not find it without torch
        def __init__(self, model, loss) -> None:
            super().__init__(model)

    with pytest.raises(TypeError, match="list it in WRAPPING_LOSSES"):
        register("dense")(WrapsALoss)

    class CoSENTLoss(Loss):  # a second dense loss of a registered name
        pass

    with pytest.raises(TypeError, match="dense loss CoSENTLoss is registered twice"):
        register("dense")(CoSENTLoss)
    with pytest.raises(ValueError, match="kind must be one of"):
        register("sparce")
    assert loss_names("dense") == before


def test_the_contract_tables_agree_with_the_classes():
    """needs_labels without a kind reads the loss of that name in any kind, so losses of one name
    agree; list inputs are a cross-encoder affair; every wrapping loss named for configs exists."""
    from raytrieve.losses.registry import loss_classes
    from raytrieve.wrapping_losses import WRAPPING_LOSSES

    kinds = ("dense", "sparse", "cross")
    labels: dict[str, set[bool]] = {}
    for kind in kinds:
        for name, cls in loss_classes(kind).items():
            labels.setdefault(name, set()).add(cls.needs_labels)
            assert not cls.listwise or kind == "cross", name
    assert all(len(v) == 1 for v in labels.values()), {n: v for n, v in labels.items() if len(v) > 1}
    assert set(WRAPPING_LOSSES) <= set(labels)
    listwise = {n for n, c in loss_classes("cross").items() if c.listwise}
    assert {"LambdaLoss", "ListNetLoss"} <= listwise and "BinaryCrossEntropyLoss" not in listwise


def test_in_batch_negatives_names_exactly_the_losses_constant_on_a_one_row_batch(dense, tiny_dirs):
    """The flag training reads to refuse batch_size 1 (train/run.py), against each loss's own
    forward: on a batch of one row with the fewest columns a flagged loss gives the model no
    gradient, and every unflagged label-free dense loss does give one."""
    import torch

    from raytrieve import CrossEncoder
    from raytrieve.losses.base import Loss
    from raytrieve.losses.registry import loss_classes
    from raytrieve.wrapping_losses import WRAPPING_LOSSES

    def moves(loss, model, inputs, labels=None) -> bool:
        params = [p for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        loss(inputs, labels).backward()
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    texts = ["a striped zebra", "a striped zebra runs", "tax law of 1990"]  # GIST keeps a negative its guide ranks below the positive
    flagged = set()
    for name, cls in loss_classes("dense").items():
        if name in WRAPPING_LOSSES or not issubclass(cls, Loss) or (cls.needs_labels and not cls.in_batch_negatives):
            continue  # a wrapper, the TSDAE decoder, or a label per row: a target without other rows
        torch.manual_seed(0)
        loss = cls(dense, guide=dense) if "guide" in inspect.signature(cls.__init__).parameters else cls(dense)
        labels = torch.zeros(1, dtype=torch.long) if cls.needs_labels else None
        one_row = [dense.tokenize([t]) for t in texts[: cls.columns[0]]]
        assert moves(loss, dense, one_row, labels) is not cls.in_batch_negatives, name
        if cls.in_batch_negatives:
            flagged.add(name)
            if cls.columns[1] is None or cls.columns[1] > cls.columns[0]:  # a hard-negative column: it learns
                with_negative = [dense.tokenize([t]) for t in texts[: cls.columns[0] + 1]]
                assert moves(loss, dense, with_negative, labels), name
    assert {"MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "GISTEmbedLoss",
            "CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss", "MegaBatchMarginLoss",
            "ContrastiveTensionLossInBatchNegatives", "BatchHardTripletLoss"} <= flagged
    assert loss_classes("sparse")["SparseMultipleNegativesRankingLoss"].in_batch_negatives
    # The cross-encoder MNRL samples its negatives from the other rows.
    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    loss = build_loss(LossSpec("MultipleNegativesRankingLoss"), cross, "cross")
    assert type(loss).in_batch_negatives
    assert not moves(loss, cross, [["a query"], ["its passage"]])
    assert moves(loss, cross, [["a query"], ["its passage"], ["another passage"]])


def test_object_arguments_are_written_by_name(dense, tiny_dirs, tiny_models):
    """sentence-transformers' object arguments (a guide model, a weighting scheme, an activation,
    a distance) by name in a config. As text they passed every check and failed on the Ray
    workers ("'str' object is not callable")."""
    import torch
    from torch import nn

    from raytrieve import CrossEncoder
    from raytrieve.losses import BatchHardTripletLoss, ContrastiveLoss, GISTEmbedLoss
    from raytrieve.losses.cross import BinaryCrossEntropyLoss
    from raytrieve.losses.listwise import LambdaLoss, ListNetLoss, NDCGLoss2PPScheme, NDCGLoss2Scheme
    from raytrieve.losses.pairwise import SiameseDistanceMetric, pairwise_dot_score
    from raytrieve.losses.triplet import BatchHardTripletLossDistanceFunction, TripletDistanceMetric

    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    lam = build_loss(_spec({"name": "LambdaLoss", "args": {"weighting_scheme": "NDCGLoss2Scheme"}}), cross, "cross")
    assert isinstance(lam, LambdaLoss) and isinstance(lam.weighting_scheme, NDCGLoss2Scheme)
    lam = build_loss(_spec({"name": "LambdaLoss", "args": {"weighting_scheme": {"name": "NDCGLoss2PPScheme",
                                                                                "args": {"mu": 5.0}}}}), cross, "cross")
    assert isinstance(lam.weighting_scheme, NDCGLoss2PPScheme) and lam.weighting_scheme.mu == 5.0
    net = build_loss(_spec({"name": "ListNetLoss", "args": {"activation_fn": "torch.nn.Identity"}}), cross, "cross")
    assert isinstance(net, ListNetLoss) and isinstance(net.activation_fn, nn.Identity)
    bce = build_loss(_spec({"name": "BinaryCrossEntropyLoss", "args": {"pos_weight": 2}}), cross, "cross")
    assert isinstance(bce, BinaryCrossEntropyLoss) and torch.equal(bce.bce.pos_weight, torch.tensor(2.0))
    triplet = build_loss(_spec({"name": "TripletLoss", "args": {"distance_metric": "TripletDistanceMetric.COSINE"}}),
                         dense, "dense")
    assert triplet.distance_metric is TripletDistanceMetric.COSINE
    hard = build_loss(_spec({"name": "BatchHardTripletLoss", "args": {"distance_metric": "cosine_distance"}}),
                      dense, "dense")
    assert isinstance(hard, BatchHardTripletLoss)
    assert hard.distance_metric == BatchHardTripletLossDistanceFunction.cosine_distance
    siamese = build_loss(_spec({"name": "ContrastiveLoss", "args": {"distance_metric": "euclidean"}}), dense, "dense")
    assert isinstance(siamese, ContrastiveLoss) and siamese.distance_metric is SiameseDistanceMetric.EUCLIDEAN

    # CoSENT takes one score per pair: "dot" is the pairwise dot product (it was the score
    # matrix), and the loss equals the one built in Python with that function.
    texts = (["a cat sat", "stocks fell", "rain again"], ["the cat sits", "markets dropped", "sunny day"])
    features = [dense.tokenize(list(t)) for t in texts]
    labels = torch.tensor([0.9, 0.8, 0.1])
    got = build_loss(_spec({"name": "CoSENTLoss", "args": {"similarity_fct": "dot"}}), dense, "dense")
    assert got.similarity_fct is pairwise_dot_score
    from sentence_transformers import SentenceTransformer, util
    from sentence_transformers.losses import CoSENTLoss as StCoSENT

    ours_saved = DenseEncoder(tiny_models["dense"], device="cpu")  # the same weights in both libraries
    theirs = SentenceTransformer(str(tiny_models["dense"]), device="cpu")
    got = build_loss(_spec({"name": "CoSENTLoss", "args": {"similarity_fct": "dot"}}), ours_saved, "dense")
    want = StCoSENT(theirs, similarity_fct=util.pairwise_dot_score)
    ours_features = [ours_saved.tokenize(list(t)) for t in texts]
    their_features = [theirs.tokenize(list(t)) for t in texts]
    torch.testing.assert_close(got(ours_features, labels), want(their_features, labels), atol=1e-5, rtol=1e-5)
    # ... and pairwise_angle_sim (CoSENT with it is AnglE), which was refused.
    got = build_loss(_spec({"name": "CoSENTLoss", "args": {"similarity_fct": "pairwise_angle_sim"}}), ours_saved,
                     "dense")
    want = StCoSENT(theirs, similarity_fct=util.pairwise_angle_sim)
    torch.testing.assert_close(got(ours_features, labels), want(their_features, labels), atol=1e-5, rtol=1e-5)
    # MNRL's directions (a tuple by default) from a config's list.
    mnrl = build_loss(_spec({"name": "MultipleNegativesRankingLoss",
                             "args": {"directions": ["query_to_doc", "doc_to_query"]}}), dense, "dense")
    assert list(mnrl.directions) == ["query_to_doc", "doc_to_query"]
    assert build_loss(_spec({"name": "TripletLoss", "args": {"distance_metric": "COSINE"}}), dense,
                      "dense").distance_metric is TripletDistanceMetric.COSINE
    assert build_loss(_spec({"name": "LambdaLoss", "args": {"weighting_scheme": None}}), cross, "cross")

    # GIST's guide: a dense model by reference, frozen (the optimizer takes the loss's parameters).
    gist = build_loss(_spec({"name": "GISTEmbedLoss", "args": {"guide": str(tiny_models["dense"])}}), dense, "dense")
    assert isinstance(gist, GISTEmbedLoss) and isinstance(gist.guide, DenseEncoder)
    assert not any(p.requires_grad for p in gist.guide.parameters())
    guide = DenseEncoder(tiny_models["dense"], device="cpu")
    torch.testing.assert_close(gist(features), GISTEmbedLoss(dense, guide)(features))

    for spec, kind, message in [
        ({"name": "GISTEmbedLoss"}, "dense", r"loss.args.guide is required for GISTEmbedLoss \(e.g. all-minilm"),
        ({"name": "GISTEmbedLoss", "args": {"guide": str(tiny_models["cross"])}}, "dense",
         r"loss.args.guide: .* is a cross model"),
        ({"name": "LambdaLoss", "args": {"weighting_scheme": "ndcg2pp"}}, "cross",
         r"loss.args.weighting_scheme: 'ndcg2pp'; choose from \['LambdaRankScheme'"),
        ({"name": "ListNetLoss", "args": {"activation_fn": "os.system"}}, "cross",
         r"loss.args.activation_fn: 'os.system'; name a torch.nn class"),
        ({"name": "ListNetLoss", "args": {"activation_fn": "Sigmoyd"}}, "cross", r"'Sigmoyd' is no torch.nn class"),
        ({"name": "TripletLoss", "args": {"distance_metric": "hamming"}}, "dense",
         r"loss.args.distance_metric: 'hamming' is no distance TripletLoss takes; choose from \['COSINE'"),
        ({"name": "CoSENTLoss", "args": {"similarity_fct": "euclidean"}}, "dense", r"CoSENTLoss takes 'cosine' or 'dot' or 'angle'"),
        ({"name": "ListNetLoss", "args": {"activation_fn": ["Sigmoid"]}}, "cross",
         r"loss.args.activation_fn: give ListNetLoss's activation_fn by its name \(text\), not \['Sigmoid'\]"),
        ({"name": "ListNetLoss", "args": {"activation_fn": "PReLU"}}, "cross", r"'PReLU' is no activation or loss"),
        ({"name": "ListNetLoss", "args": {"activation_fn": "Transformer"}}, "cross", r"is no activation or loss"),
        ({"name": "GISTEmbedLoss", "args": {"guide": None}}, "dense", r"loss.args.guide: null is not a value"),
        ({"name": "CoSENTLoss", "args": {"similarity_fct": None}}, "dense", r"similarity_fct: null is not a value"),
        ({"name": "ContrastiveLoss", "args": {"distance_metric": "TripletDistanceMetric.EUCLIDEAN"}}, "dense",
         r"ContrastiveLoss takes a SiameseDistanceMetric"),
        ({"name": "SpladeLoss", "args": {"document_regularizer_weight": 3e-5, "document_regularizer": "FlopsLoss"},
          "inner": {"name": "SparseMultipleNegativesRankingLoss"}}, "sparse",
         r"loss.args.document_regularizer: SpladeLoss takes a Python object here, not 'FlopsLoss'"),
    ]:
        model = SparseEncoder(tiny_dirs["mlm"], device="cpu") if kind == "sparse" else cross if kind == "cross" else dense
        with pytest.raises(ConfigError, match=message):
            build_loss(_spec(spec), model, kind)
