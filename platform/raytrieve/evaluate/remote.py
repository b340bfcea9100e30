"""Every stage of a running Serve app from one /search answer per query (``return_stages``):
the dense and sparse lists, the fused list, and the reranked head, after which the fused
order continues (as the in-process path ranks them)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raytrieve.errors import InputError
from raytrieve.evaluate.run import FUSED, RERANKED, Rankings

log = logging.getLogger("raytrieve.evaluate")
TOKEN_ENV = "RAYTRIEVE_API_TOKEN"  # ServeConfig.auth_token_env's default


def _body(given: Mapping[str, Any], rerank: bool) -> dict[str, Any]:
    """The /search request: ``given`` (the settings the command line named) over the app's own
    ``search:`` defaults, which fill everything else, so what is measured is what is served."""
    return {"top_k": 1, "rerank": rerank, "return_text": False, "return_stages": True, **given}


def _ask(url: str, query: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{url}/search", data=json.dumps({"query": query, **body}).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
    except OSError as e:
        reason = str(e)
    hint = f" (set {TOKEN_ENV} to the app's token)" if "bearer token" in reason else ""
    raise InputError(f"--url {url}: /search failed ({reason}){hint}; check that the app is up and serves /search")


def url_rankings(
    url: str, queries: Mapping[str, str], given: Mapping[str, Any], clients: int = 4
) -> tuple[Rankings, dict[str, Any]]:
    """Each query once through the app's whole pipeline; returns the rankings of every stage and
    the settings the app ran (its ``search:`` defaults under ``given``). Rerank is asked for, and
    left out when the app serves no reranker (its answer to the first query says so). An app that
    wants a bearer token gets the value of $RAYTRIEVE_API_TOKEN (the serve config's default
    variable)."""
    url, token = url.rstrip("/"), os.environ.get(TOKEN_ENV)
    qids = sorted(queries)
    rerank = True
    try:
        first = _ask(url, queries[qids[0]], _body(given, rerank), token)
    except InputError as e:
        if "no reranker" not in str(e):
            raise
        log.info("%s serves no reranker: the reranked stage is left out", url)
        rerank = False
        first = _ask(url, queries[qids[0]], _body(given, rerank), token)
    body = _body(given, rerank)
    with ThreadPoolExecutor(max_workers=max(1, clients)) as pool:
        answers = [first, *pool.map(lambda q: _ask(url, queries[q], body, token), qids[1:])]
    rankings: Rankings = {}
    for qid, answer in zip(qids, answers):
        stages = answer.get("stages")
        if not isinstance(stages, dict) or not isinstance(answer.get("settings"), dict):
            raise InputError(f"--url {url}: /search answered without 'stages'; is it a raytrieve Serve app?")
        lists = {name: [d for d, _ in ranked] for name, ranked in stages.items() if name not in (FUSED, RERANKED)}
        for name, ranked in lists.items():
            rankings.setdefault(name, {})[qid] = ranked
        fused = [d for d, _ in stages[FUSED]]
        if len(lists) > 1:
            rankings.setdefault(FUSED, {})[qid] = fused
        if rerank:  # the reranked head, then the fused order (as the in-process path ranks them)
            head = [d for d, _ in stages.get(RERANKED, [])]
            seen = set(head)
            rankings.setdefault(RERANKED, {})[qid] = head + [d for d in fused if d not in seen]
    return rankings, first["settings"]
