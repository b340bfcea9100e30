"""``raytrieve evaluate --tune-on SPLIT``: /search's recall depths, fusion and rerank depth
fitted on one split's judgements, then scored on the evaluated split as the ``tuned`` stage.

The first stages' candidate lists are computed once for both splits' queries (one corpus
encoding); serve/tuning.py replays /search on the tuning split's lists under every setting,
then the reranker scores the chosen fusion's top candidates to pick the rerank depth. The
setting is written as a serve config fragment (``search.yaml``: /search's defaults, see
serve/config.py ``SearchDefaults``), and into a copy of ``--serve-config`` when one is given.
The report gives the tuning split's figure next to the evaluated split's: only the latter is
held out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from raytrieve.errors import ConfigError
from raytrieve.evaluate.run import Lists, RunOptions, fusion_setting
from raytrieve.serve import tuning

log = logging.getLogger("raytrieve.evaluate")

Scorer = Callable[[list[tuple[str, str]]], Sequence[float]]


def check_splits(tuned: Mapping[str, Any], scored: Mapping[str, Any], tuning_file: str, scored_file: str) -> None:
    """The fit must not see a query it is scored on: the tuned figure is reported as held out."""
    shared = sorted(set(tuned) & set(scored))
    if shared:
        raise ConfigError(
            f"--tune-on: {len(shared)} judged query id(s) of {tuning_file} are also judged in {scored_file}, "
            f"e.g. {shared[:3]}; tune on a split whose queries the evaluated split does not have"
        )


def check_serve_config(
    path: str,
    reranker: bool,
    depth: int,
    models: Mapping[str, str | None] | None = None,
    max_seq_lengths: Mapping[str, int | None] | None = None,
) -> None:
    """``--serve-config`` will hold the fit: refused before any model loads if it could not.
    ``models``: the evaluated model of each served field (dense, sparse, reranker; None: none),
    each of which must be the one the config serves there, or the fit would be of other models.
    ``max_seq_lengths``: each field's truncation in this evaluation (--max-seq-length, the
    reranker's --reranker-max-seq-length); a served model set to truncate at another length gets a
    warning, since its scores, and so the fit's best setting, may differ (when either side is
    unset, each model's own default, nothing is compared)."""
    from raytrieve.serve.config import load_serve_config

    cfg = load_serve_config(path)
    # Each evaluated field with the config's default deployment there (none there: nothing to check).
    defaults = {m.kind: m for m in cfg.served() if m.default}
    pairs = {f: (model, defaults[f]) for f, model in (models or {}).items() if model is not None and f in defaults}
    for field, (evaluated, served) in pairs.items():
        if not _same_model(served.spec.model, evaluated):
            raise ConfigError(
                f"--serve-config {path} serves {served.spec.model!r} as {field}, but this evaluation fits --{field} "
                f"{evaluated!r}: the fitted search: would be served with other models. Point the config's "
                f"{served.path}.model at {evaluated!r} (and its index at that model's), or evaluate the served model"
            )
    for field, (_, served) in pairs.items():  # after every model is known to be the served one
        length, ours = served.spec.max_seq_length, (max_seq_lengths or {}).get(field)
        if length is not None and ours is not None and length != ours:
            flag = "--reranker-max-seq-length" if field == "reranker" else "--max-seq-length"
            log.warning(
                "--serve-config %s serves %s at max_seq_length %s, but this evaluation truncates at %s: the fit "
                "is of other scores than /search will compute. Pass %s %s, or set %s.max_seq_length "
                "in the config to %s",
                path,
                field,
                length,
                ours,
                flag,
                length,
                served.path,
                ours,
            )
    if reranker != (cfg.reranker is not None):
        have = "serves a reranker" if cfg.reranker is not None else "serves no reranker"
        raise ConfigError(
            f"--serve-config {path} {have}, but this evaluation "
            f"{'reranks (--reranker)' if reranker else 'has no --reranker'}: the fit would not be what it serves; "
            "give both or neither"
        )
    needs = {"max_recall": depth, "max_rerank_depth": max(tuning.RERANK_DEPTHS) if reranker else 1}
    low = {k: v for k, v in needs.items() if getattr(cfg.limits, k) < v}
    if low:
        raise ConfigError(
            f"--serve-config {path}: limits {', '.join(f'{k}={getattr(cfg.limits, k)}' for k in low)} are below "
            f"what the fit may choose ({', '.join(f'{k} {v}' for k, v in low.items())}); raise them in the config"
        )


def check_stages(kinds: Mapping[str, str]) -> None:
    """A served app has one dense and one sparse retriever: the fit is for such a pair."""
    if sorted(kinds) != sorted(set(kinds.values())) or not kinds:
        raise ConfigError(
            "--tune-on fits /search, which serves one dense and/or one sparse model; got first stages "
            f"{sorted(kinds)}. Pass at most one --dense and one --sparse"
        )


def fit(
    lists: Lists,
    qrels: Mapping[str, Mapping[str, float]],
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    scorer: Scorer | None,
    options: RunOptions,
    k: int,
) -> tuple[tuning.Setting, dict[str, Any], tuning.Setting | None]:
    """The setting with the best mean NDCG@k on these queries (``qrels``), what the fit saw, and
    the setting "tuned+rerank" scores: the best that reranks when the fit did not adopt a rerank
    (None: it did, or there is no reranker)."""
    qids = sorted(qrels)
    candidates = {q: {n: lists[n][q] for n in lists} for q in qids}
    fused = tuning.fit_fusion(candidates, qrels, tuning.recall_depths(options.depth), k)
    untuned = fusion_setting(list(lists), {n: n for n in lists}, options)
    info: dict[str, Any] = {
        "queries": len(qids),
        f"ndcg@{k}": {
            "fitted_fusion": fused.score,
            "untuned_fusion": tuning.mean(tuning.per_query(candidates, qrels, untuned, k=k)),
        },
        "best_settings": [{"setting": s.label(), f"ndcg@{k}": v} for s, v in fused.tried[:10]],
    }
    best, rerank_scores, with_rerank = fused.best, None, None
    if scorer is not None:
        deepest = max(tuning.RERANK_DEPTHS)
        rerank_scores = tuning.cross_scores(candidates, best, deepest, queries, corpus, scorer)
        reranked = tuning.fit_rerank(candidates, qrels, best, rerank_scores, tuning.RERANK_DEPTHS, k)
        best = reranked.best
        info["rerank"] = {
            s.rerank_key(): v
            for s, v in sorted(reranked.tried, key=lambda sv: (sv[0].rerank_depth, sv[0].rerank_weight))
        }
        info["rerank_gain"] = reranked.gain  # the best depth and weight against none; adopted only if clear
        info["with_rerank"] = None  # the label of what "tuned+rerank" scores, when the fit kept the rerank off
        if not best.rerank_depth:
            with_rerank = tuning.best_reranking(reranked)
            info["with_rerank"] = None if with_rerank is None else with_rerank.label()
    info[f"ndcg@{k}"]["fitted"] = tuning.mean(tuning.per_query(candidates, qrels, best, rerank_scores, k))
    info["setting"] = best.search_fields()
    info["label"] = best.label()
    log.info("fitted on %d queries: %s (NDCG@%d %.4f)", len(qids), best.label(), k, info[f"ndcg@{k}"]["fitted"])
    return best, info, with_rerank


def rankings(
    lists: Lists,
    qids: Sequence[str],
    setting: tuning.Setting,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    scorer: Scorer | None,
) -> dict[str, list[str]]:
    """The ranking /search gives each query under ``setting``."""
    candidates = {q: {n: lists[n][q] for n in lists} for q in qids}
    if not setting.rerank_depth or scorer is None:
        return {q: tuning.fused(candidates[q], setting) for q in qids}
    scores = tuning.cross_scores(candidates, setting, setting.rerank_depth, queries, corpus, scorer)
    return {q: tuning.replay(candidates[q], setting, scores[q]) for q in qids}


def write_fragments(setting: tuning.Setting, out: Path, serve_config: str | None) -> list[Path]:
    """``search.yaml`` (the serve config's ``search:`` section) and, from ``serve_config``,
    ``serve_tuned.yaml`` with it in place; both load as the serve config checks them."""
    import yaml

    from raytrieve._io import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    fragment = {"search": setting.search_fields()}
    written = [out / "search.yaml"]
    with atomic_file(written[0]) as tmp:
        tmp.write_text("# /search's defaults fitted by raytrieve evaluate --tune-on\n" + yaml.safe_dump(fragment))
    if serve_config:
        from raytrieve.config import from_dict, merge
        from raytrieve.serve.config import ServeConfig, load_serve_config

        base = load_serve_config(serve_config)  # refused here, naming the file, if it does not load
        # The keys the file sets, and search: (every default written out would pin this
        # version's defaults and bury the user's few lines).
        given = merge(base.model_dump(mode="json", exclude_unset=True), fragment)
        tuned = from_dict(ServeConfig, given, where=str(serve_config))
        written.append(out / "serve_tuned.yaml")
        dumped = _absolute_paths(tuned.model_dump(mode="json", exclude_unset=True))
        with atomic_file(written[1]) as tmp:
            header = f"# {serve_config} with /search's defaults fitted by raytrieve evaluate --tune-on\n"
            tmp.write_text(header + yaml.safe_dump(dumped, sort_keys=False))
    return written


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A serve config's relative index folders and model folders made absolute (they were
    relative to where evaluate ran; the written file is served from anywhere)."""

    def fix(entry: dict[str, Any]) -> None:
        for key in ("index", "model"):
            value = entry.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
                entry[key] = str(Path(value).resolve())

    fix(config)
    for kind in ("dense", "sparse", "reranker"):
        entries = config.get(kind)
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                fix(entry)
    return config


def _same_model(a: str, b: str) -> bool:
    """The same reference, folder, or weights (a registered copy of a folder)."""
    from raytrieve.assets import same_model_files
    from raytrieve.errors import RaytrieveError
    from raytrieve.model_ref import resolve_model

    if a == b:
        return True
    try:
        return same_model_files(resolve_model(a), resolve_model(b))
    except RaytrieveError:  # an unresolvable reference is reported where it is used
        return True
