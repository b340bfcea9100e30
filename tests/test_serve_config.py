"""Serve configs without Ray: /search's limits (one rule for the config's search: defaults and
for requests), and search: defaults that would switch every served retriever off."""

from __future__ import annotations

import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.serve.config import LimitsConfig, SearchDefaults, ServeConfig, search_limit_error
from raytrieve.serve.http_guard import ApiError
from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.shapes import check_search_limits


def _cfg(**keys) -> ServeConfig:
    return from_dict(ServeConfig, keys, where="serve.yaml")


def _refused(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**keys)


def test_search_limits_are_one_rule_for_the_config_and_the_requests():
    limits = LimitsConfig(max_top_k=20, max_recall=150, max_rerank_depth=30)
    cases = [
        ({"top_k": 21}, "top_k"),
        ({"recall": {"sparse": 151}}, "recall.sparse"),
        ({"rerank": True, "rerank_depth": 31}, "rerank_depth"),
    ]
    for fields, field in cases:
        request = SearchRequest.model_validate({"query": "q", **fields})
        assert search_limit_error(request, limits)[0] == field  # type: ignore[index]
        assert search_limit_error(SearchDefaults.model_validate(fields), limits)[0] == field  # type: ignore[index]
        with pytest.raises(ApiError) as e:
            check_search_limits(request, limits)
        assert (e.value.status, e.value.field) == (422, field)
        _refused(
            {"dense": {"model": "m"}, "limits": limits.model_dump(), "search": fields}, f"serve.yaml.search.{field}: "
        )
    assert search_limit_error(SearchRequest(query="q", rerank_depth=31), limits) is None  # no rerank: not checked


def test_search_defaults_that_switch_off_every_served_retriever_are_refused():
    both = {"dense": {"model": "m"}, "sparse": {"model": "s"}, "index": "/i"}
    _refused(
        {**both, "search": {"recall": {"dense": 0, "sparse": 0}}},
        r"serve.yaml.search.recall: every served retriever is switched off \(dense: 0, sparse: 0\).*dense or sparse",
    )
    assert _cfg(**both, search={"recall": {"dense": 0}}).search.recall.sparse == 100  # one left on
    # Without an index there is no /search to switch off; a kind not served does not count.
    assert _cfg(dense={"model": "m"}, search={"recall": {"dense": 0}})
    _refused(
        {"dense": {"model": "m"}, "index": "/i", "search": {"recall": {"dense": 0, "sparse": 7}}},
        r"switched off \(dense: 0\)",
    )
