"""Fusion functions against hand computation, and the serve config's checks."""

from __future__ import annotations

import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.serve import fusion
from raytrieve.serve.config import ServeConfig

DENSE = [("a", 0.9), ("b", 0.8), ("c", 0.5)]
SPARSE = [("c", 12.0), ("d", 7.0), ("a", 1.0)]


def test_rrf_by_hand():
    fused = dict(fusion.rrf([DENSE, SPARSE], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62) and fused["d"] == pytest.approx(1 / 62)
    # a and c tie exactly: the one first seen (a, in the first list) comes first; so do b before d.
    assert [d for d, _ in fusion.rrf([DENSE, SPARSE], k=60)] == ["a", "c", "b", "d"]


def test_convex_minmax_and_zscore_by_hand():
    fused = dict(fusion.convex([DENSE, SPARSE], [0.7, 0.3], "minmax"))
    assert fused["a"] == pytest.approx(0.7 * 1.0 + 0.3 * 0.0)
    assert fused["b"] == pytest.approx(0.7 * 0.75 + 0.3 * 0.0)  # missing from sparse: its floor, 0
    assert fused["c"] == pytest.approx(0.7 * 0.0 + 0.3 * 1.0)
    assert fused["d"] == pytest.approx(0.7 * 0.0 + 0.3 * (6 / 11))  # missing from dense: floor 0
    z = dict(fusion.convex([DENSE], [1.0], "zscore"))
    assert sum(z.values()) == pytest.approx(0.0, abs=1e-12)
    assert list(dict(fusion.convex([DENSE, SPARSE], [1, 1], "none"))) == ["c", "d", "a", "b"]
    with pytest.raises(ValueError, match="one weight per list"):
        fusion.convex([DENSE, SPARSE], [1.0])


def test_serve_config_checks():
    with pytest.raises(ConfigError, match="at least one of dense:, sparse:, reranker:"):
        from_dict(ServeConfig, {}).check()
    with pytest.raises(ConfigError, match="index needs a dense: or sparse: model"):
        from_dict(ServeConfig, {"reranker": {"model": "x"}, "index": "somewhere"}).check()
    with pytest.raises(ConfigError, match="share the name"):
        from_dict(ServeConfig, {"dense": {"model": "m"}, "sparse": {"model": "m"}}).check()
    with pytest.raises(ConfigError, match="limits.max_inputs must be >= 1"):
        from_dict(ServeConfig, {"dense": {"model": "m"}, "limits": {"max_inputs": 0}}).check()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['replicas'\]"):
        from_dict(ServeConfig, {"dense": {"model": "m", "replicas": 2}})
    assert from_dict(ServeConfig, {"dense": {"model": "m"}}).host == "127.0.0.1"


def test_convex_ranks_a_document_a_list_did_not_return_below_those_it_did():
    """A list of one hit (or of tied hits) normalizes them all to its floor's value: the
    documents it did not return then tied with its hit, and a document both retrievers found
    ranked last."""
    dense = [("a", 0.9), ("b", 0.5), ("c", 0.1)]
    for sparse in ([("c", 7.0)], [("c", 7.0), ("d", 7.0)]):
        fused = dict(fusion.convex([dense, sparse], [0.5, 0.5], "minmax"))
        assert fused["c"] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
        assert fused["a"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
        assert fused["b"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
        z = dict(fusion.convex([dense, sparse], [0.5, 0.5], "zscore"))
        assert z["c"] == pytest.approx(0.5 * -1.224744871391589 + 0.5 * 0.0)  # dense z of 0.1; sparse: found
        assert z["b"] == pytest.approx(0.5 * 0.0 + 0.5 * -1.0)  # not found by sparse: below its hits
    # Hits that do not tie keep the lowest hit's score as the floor (0 after min-max).
    fused = dict(fusion.convex([dense, [("c", 7.0), ("d", 3.0)]], [0.5, 0.5], "minmax"))
    assert fused["d"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.0) and fused["a"] == pytest.approx(0.5)
