"""``raytrieve evaluate`` (and ``jobs/evaluate.py``): its arguments, and the run in order:
read and check the data, rank with every stage the models allow, score, write the report.

    raytrieve evaluate --data beir/scifact --dense all-minilm-l6-v2 --sparse splade-tiny \\
        --reranker ms-marco-minilm-l12-v2 --out eval/pretrained
    raytrieve evaluate --data beir/scifact --url http://127.0.0.1:8100 --compare eval/pretrained/evaluation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Any

from raytrieve.errors import ConfigError

if typing.TYPE_CHECKING:
    from raytrieve.evaluate.run import RunOptions

log = logging.getLogger("raytrieve.evaluate")

DEFAULT_MAX_IN_PROCESS_ROWS = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (a BEIR folder, or three files with named columns)")
    data.add_argument("--data", help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    data.add_argument("--split", default="test", help="the qrels file qrels/<split>.tsv of --data (default: test)")
    data.add_argument("--corpus", help="documents: .jsonl or .parquet (instead of --data)")
    data.add_argument("--queries", help="queries: .jsonl or .parquet")
    data.add_argument("--qrels", help="judgements: .tsv / .csv (with a header), .jsonl or .parquet")
    data.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="a column's name, e.g. corpus_id=id, corpus_text=document, corpus_title=, query_id=qid, "
        "query_text=query, qrels_query=query-id, qrels_doc=corpus-id, qrels_score=score (defaults: BEIR's)",
    )
    models = parser.add_argument_group("what ranks (models, an index, or a running app)")
    models.add_argument("--dense", action="append", default=[], metavar="MODEL", help="a dense model (repeatable)")
    models.add_argument("--sparse", action="append", default=[], metavar="MODEL", help="a sparse model (repeatable)")
    models.add_argument("--reranker", metavar="MODEL", help="a cross-encoder over the fused top --rerank-depth")
    models.add_argument("--index", help="an index folder (`raytrieve index build`) to search instead of encoding")
    models.add_argument("--url", help="a running Serve app: every stage from its /search (return_stages)")
    models.add_argument("--clients", type=int, default=4, help="concurrent /search requests with --url")
    ranking = parser.add_argument_group("ranking (as /search takes them)")
    ranking.add_argument("--depth", type=int, help="candidates from each first stage (default: max(100, --recall-k))")
    # Left unset, these are /search's own defaults (with --url: the app's search: settings).
    ranking.add_argument("--rerank-depth", type=int, help="fused candidates the reranker rescores (default 50)")
    ranking.add_argument("--fusion", choices=["rrf", "convex"], help="default rrf")
    ranking.add_argument("--rrf-k", type=float, help="default 60")
    ranking.add_argument("--dense-weight", type=float, help="convex fusion (default 0.5)")
    ranking.add_argument("--sparse-weight", type=float, help="convex fusion (default 0.5)")
    ranking.add_argument("--normalization", choices=["minmax", "zscore", "none"], help="default minmax")
    ranking.add_argument("--max-seq-length", type=int, help="truncate texts for every model (default: each model's)")
    ranking.add_argument(
        "--reranker-max-seq-length",
        type=int,
        help="the reranker's query and document together (default: --max-seq-length, else the model's own)",
    )
    ranking.add_argument("--batch-size", type=int, default=32)
    ranking.add_argument(
        "--token-budget",
        type=int,
        help="the reranker's padded tokens per batch (pairs x longest pair; --batch-size then caps the pairs)",
    )
    ranking.add_argument("--dtype", default="float32", help="float32 (exact), auto, bfloat16, float16 or int8")
    ranking.add_argument(
        "--max-in-process-rows",
        type=int,
        default=DEFAULT_MAX_IN_PROCESS_ROWS,
        help="a larger corpus is encoded by the encoding job (Ray) and searched through an index",
    )
    tune = parser.add_argument_group("fitting /search's settings on another split")
    tune.add_argument(
        "--tune-on",
        metavar="SPLIT|QRELS",
        help="fit recall depths, fusion, rerank depth and weight on this split's judgements (with --data: a split "
        "name; else a qrels file), report them as the 'tuned' stage on the evaluated split (and the best rerank, if "
        "not adopted, as 'tuned+rerank'), write <out>/search.yaml",
    )
    tune.add_argument("--serve-config", help="with --tune-on: also write <out>/serve_tuned.yaml, this config + the fit")
    report = parser.add_argument_group("report")
    report.add_argument("--k", type=int, default=10, help="the cut of NDCG, MRR, MAP, Recall and Precision")
    report.add_argument("--recall-k", type=int, default=100, help="a second cut for Recall")
    report.add_argument("--out", default="evaluation", help="folder for evaluation.json, .md and .png")
    report.add_argument("--name", help="a label for this run (shown in reports that compare with it)")
    report.add_argument("--compare", metavar="JSON", help="an earlier run's evaluation.json: paired differences")
    report.add_argument("--bootstrap-rounds", type=int, default=2000)
    report.add_argument("--no-chart", action="store_true", help="skip evaluation.png")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _columns(items: list[str]) -> Any:
    from raytrieve.config import from_dict
    from raytrieve.evaluate.data import Columns

    given: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--column {item!r} must look like KEY=NAME, e.g. corpus_id=id")
        given[key] = value or None  # corpus_title= (empty): the corpus has no titles
    return from_dict(Columns, given, "--column")


def _check(args: argparse.Namespace) -> None:
    """Flags that contradict each other, before any file is read."""
    _positive(args, "k", "recall_k", "depth", "rerank_depth", "batch_size", "max_seq_length", "clients", "token_budget")
    _positive(args, "bootstrap_rounds", "max_in_process_rows", "reranker_max_seq_length")
    from raytrieve.config import Dtype, refuse_uri

    if args.dtype not in typing.get_args(Dtype):
        raise ConfigError(f"--dtype {args.dtype!r}: choose one of {list(typing.get_args(Dtype))}")
    refuse_uri(args.out, "--out")  # written on disk (evaluation.json, .md, .png, the work folder)
    if args.index:
        refuse_uri(args.index, "--index")  # memory-mapped
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found only after every model ran
        raise ConfigError(f"--out {args.out}: is a file; give a folder (evaluation.json, .md and .png go there)")
    files = [args.corpus, args.queries, args.qrels]
    if args.data and any(files):
        raise ConfigError("--data is a BEIR folder; pass it or --corpus/--queries/--qrels, not both")
    if not args.data and not all(files):
        raise ConfigError("no data: pass --data BEIR_FOLDER, or all of --corpus, --queries and --qrels")
    has_models = args.dense or args.sparse or args.reranker
    if args.url and (has_models or args.index):
        raise ConfigError("--url evaluates the app's own models and index; drop --dense/--sparse/--reranker/--index")
    if args.reranker_max_seq_length and not args.reranker:
        fix = "; pass --reranker too"
        if args.url:
            fix = ": with --url the app's reranker runs at its served length; drop it"
        raise ConfigError(f"--reranker-max-seq-length truncates the --reranker's pairs{fix}")
    if not args.url and not args.index and not (args.dense or args.sparse):
        raise ConfigError("nothing retrieves: pass --dense and/or --sparse models, --index DIR, or --url")
    if args.tune_on and args.url:
        raise ConfigError(
            "--tune-on replays /search on each query's candidates, which needs the models or an --index; "
            "with --url, evaluate the app after serving the fitted config"
        )
    if args.tune_on and args.data and args.tune_on == args.split:
        raise ConfigError(f"--tune-on {args.tune_on} is the evaluated --split: tune on another split (e.g. dev)")
    if args.tune_on and not args.data and Path(args.tune_on).resolve() == Path(args.qrels).resolve():
        raise ConfigError(f"--tune-on {args.tune_on} is the evaluated --qrels: tune on another qrels file")
    if args.serve_config and not args.tune_on:
        raise ConfigError("--serve-config is written with the fit: pass --tune-on SPLIT too")
    depth = args.depth or max(100, args.recall_k)
    if depth < max(args.k, args.recall_k):
        raise ConfigError(
            f"--depth {depth}: each first stage's list is cut there, so recall@{args.recall_k} and the metrics "
            f"@{args.k} would count only {depth} candidates; give --depth >= {max(args.k, args.recall_k)} "
            "or a smaller --recall-k"
        )


def _resolve_models(args: argparse.Namespace) -> None:
    """Every model reference names a model (an MLflow one is downloaded now), so a wrong one
    fails before the others have encoded anything; the error names the flag."""
    from raytrieve.kinds import refuse_other_kind, served_kind
    from raytrieve.model_ref import check_max_seq_length, resolve_field

    given = [("dense", m) for m in args.dense] + [("sparse", m) for m in args.sparse]
    for flag, ref in given + ([("reranker", args.reranker)] if args.reranker else []):
        path = resolve_field(ref, f"--{flag} {ref}")
        # Another kind fails deep in the run, or worse, runs and is reported under this flag's label.
        fix = f"pass it as --{{field}}, and a {served_kind(flag).name} model as --{flag}"
        refuse_other_kind(path, flag, f"--{flag} {ref}:", fix)
        # A length past the model's positions was refused as the model loaded, naming neither.
        length, length_flag = args.max_seq_length, "--max-seq-length"
        if flag == "reranker" and args.reranker_max_seq_length:
            length, length_flag = args.reranker_max_seq_length, "--reranker-max-seq-length"
        check_max_seq_length(path, length, f"{length_flag} (for --{flag} {ref})")


FUSION_FLAGS = {
    "method": "fusion",
    "k": "rrf_k",
    "dense_weight": "dense_weight",
    "sparse_weight": "sparse_weight",
    "normalization": "normalization",
}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The /search settings the command line names (``--url`` sends only these: the app's own
    ``search:`` settings fill the rest, so the app is measured as it is served)."""
    given: dict[str, Any] = {}
    if args.depth:
        given["recall"] = {"dense": args.depth, "sparse": args.depth}
    fusion = {field: getattr(args, flag) for field, flag in FUSION_FLAGS.items() if getattr(args, flag) is not None}
    if fusion:
        given["fusion"] = fusion
    if args.rerank_depth is not None:
        given["rerank_depth"] = args.rerank_depth
    return given


def _settings(args: argparse.Namespace) -> Any:
    import pydantic

    from raytrieve.evaluate.run import RunOptions
    from raytrieve.serve.schemas import Fusion

    given = _given(args)
    try:  # /search's own checks of the values, naming the flag
        fusion = Fusion(**given.get("fusion", {}))
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        flag = FUSION_FLAGS.get(str(error["loc"][0]), str(error["loc"][0])).replace("_", "-")
        raise ConfigError(f"--{flag} {error.get('input')!r}: {error['msg']}") from None
    if fusion.method == "convex" and fusion.dense_weight + fusion.sparse_weight <= 0:
        raise ConfigError("--dense-weight and --sparse-weight: at least one must be > 0 for convex fusion")
    return RunOptions(
        depth=args.depth or max(100, args.recall_k),
        fusion=fusion,
        rerank_depth=50 if args.rerank_depth is None else args.rerank_depth,
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        max_seq_length=args.max_seq_length,
        reranker_max_seq_length=args.reranker_max_seq_length,
        dtype=args.dtype,
    )


def evaluate(args: argparse.Namespace, ray_address: str | None = "local") -> dict[str, Any]:
    """The whole run; returns the report (also written to ``args.out``)."""
    from raytrieve.evaluate import data, report, run

    _check(args)
    options = _settings(args)
    columns = _columns(args.column)
    started = time.perf_counter()
    if args.data:
        evalset = data.load_beir(args.data, args.split, columns)
    else:
        evalset = data.load_files(args.corpus, args.queries, args.qrels, columns)
    tuning_set = None
    if args.tune_on and args.data:
        # The tuning split's queries and qrels; its corpus is the evaluated split's, read once.
        others = "pass one of them as --tune-on (another split than --split)"
        _, queries, qrels = data.beir_files(args.data, args.tune_on, choose=others)
        tuning_set = data.load_split(evalset, queries, qrels, split=args.tune_on)
    elif args.tune_on:
        tuning_set = data.load_split(evalset, args.queries, args.tune_on)
    from raytrieve.evaluate import tune

    if tuning_set is not None:
        tune.check_splits(tuning_set.qrels, evalset.qrels, str(args.tune_on), "the evaluated split")
        if args.serve_config:  # refused before any model loads if it could not hold the fit
            evaluated = {"dense": next(iter(args.dense), None), "sparse": next(iter(args.sparse), None)}
            tune.check_serve_config(
                args.serve_config,
                bool(args.reranker),
                options.depth,
                {**evaluated, "reranker": args.reranker},
                evaluated_lengths(args.index, options),
            )
    fitted: dict[str, Any] | None = None
    # Both splits' queries get their candidates in one pass over the corpus.
    searched = (
        evalset
        if tuning_set is None
        else dataclasses.replace(evalset, queries={**tuning_set.queries, **evalset.queries})
    )
    previous = None
    prints = data.fingerprints(evalset)
    models = run.Models(list(args.dense), list(args.sparse), args.reranker)
    if args.compare:  # refused before any model loads
        previous = report.load_previous(args.compare)
        planned = None if args.url or args.index else run.planned_stages(models, tuned=tuning_set is not None)
        report.check_comparable(previous, args.compare, args.k, args.recall_k, prints, planned)
    log.info("%d queries, %d documents", len(evalset.queries), len(evalset.corpus))
    _resolve_models(args)
    if args.index and args.max_seq_length:
        _check_index_length(args, evaluated_lengths(args.index, options))
    seconds: dict[str, float] = {"load": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    # What each stage computed in (None with --url: the app's replicas report theirs at /v1/models).
    dtypes_used: run.DtypesUsed | None = None if args.url else {}
    if args.url:
        from raytrieve.evaluate.remote import url_rankings

        backend = f"the Serve app at {args.url}"
        rankings, served = url_rankings(args.url, evalset.queries, _given(args), args.clients)
        described: dict[str, Any] = {"url": args.url}
        first_lengths = None  # the app's own
        short = {name: n for name, n in served["recall"].items() if 0 < n < args.recall_k}
        if short:
            log.warning(
                "the app recalls %s candidates: each first stage's recall@%d counts only those (the app as "
                "served); pass --depth %d to recall %d (the fused and reranked stages then differ from the app)",
                " and ".join(f"{n} {name}" for name, n in short.items()),
                args.recall_k,
                args.recall_k,
                args.recall_k,
            )
        # What the app ran (its search: settings under the flags given), not this command's defaults.
        from raytrieve.serve.schemas import Fusion

        options = dataclasses.replace(
            options,
            depth=max(served["recall"].values()),
            fusion=Fusion(**served["fusion"]),
            rerank_depth=served["rerank_depth"],
        )
    else:
        index = args.index
        if index is None and len(evalset.corpus) > args.max_in_process_rows:
            log.info("%d documents > --max-in-process-rows: encoding with the encoding job", len(evalset.corpus))
            index = run.encode_corpus(evalset, models, options, Path(args.out) / "work", ray_address)
        # The first stages' truncation: --max-seq-length in process, the vectors' own over an index.
        first_lengths = {
            k: v
            for k, v in evaluated_lengths(None if index is None else str(index), options).items()
            if k != "reranker"
        }
        if index is not None:
            lists, stages = run.index_lists(searched, index, models, options, dtypes_used)
            backend = f"the index {index}"
        else:
            stages = models.first_stages()
            lists = run.in_process_lists(searched, stages, options, dtypes_used)
            backend = "exact search in process"
        seconds["first_stages"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        scorer = run.cross_encoder(args.reranker, options, dtypes_used) if args.reranker else None
        kinds = {s.name: s.kind for s in stages}
        tested = {n: {q: per_q[q] for q in evalset.queries} for n, per_q in lists.items()}
        rankings = run.combine(tested, kinds, options, evalset.queries, evalset.corpus, scorer)
        if tuning_set is not None:
            tune.check_stages(kinds)
            setting, fitted, with_rerank = tune.fit(
                lists, tuning_set.qrels, searched.queries, evalset.corpus, scorer, options, args.k
            )
            rankings[run.TUNED] = tune.rankings(
                lists, sorted(evalset.queries), setting, evalset.queries, evalset.corpus, scorer
            )
            if with_rerank is not None:  # the rerank the fit kept off, scored held out all the same
                rankings[run.TUNED_RERANK] = tune.rankings(
                    lists, sorted(evalset.queries), with_rerank, evalset.queries, evalset.corpus, scorer
                )
            fitted["split"] = args.tune_on
            fitted["written"] = [str(p) for p in tune.write_fragments(setting, Path(args.out), args.serve_config)]
        described = {
            "first_stages": {s.name: {"kind": s.kind, "model": s.model} for s in stages},
            "reranker": args.reranker,
        }
    seconds["rank"] = round(time.perf_counter() - started, 2)
    info = {
        "name": args.name,
        "backend": backend,
        "data": evalset.summary,
        "data_fingerprints": prints,
        "models": described,
        "settings": {
            "k": args.k,
            "recall_k": args.recall_k,
            "depth": options.depth,
            "rerank_depth": options.rerank_depth,
            "fusion": options.fusion.model_dump(),
            "max_seq_length": options.max_seq_length,
            "first_stage_max_seq_length": first_lengths,
            "reranker_max_seq_length": options.reranker_length if args.reranker else None,
            "dtype": options.dtype,  # as asked for (--dtype): auto resolves per model, an index's vectors had theirs
            "dtypes_used": dtypes_used,
            "bootstrap_rounds": args.bootstrap_rounds,
        },
        "seconds": seconds,
    }
    if fitted is not None:
        info["tuning"] = fitted
    rep = report.build(rankings, evalset.qrels, args.k, args.recall_k, info, args.bootstrap_rounds)
    if previous is not None:
        rep["compare"] = report.compare(rep, previous, args.compare, args.bootstrap_rounds)
    written = report.write(rep, Path(args.out), with_chart=not args.no_chart)
    for line in report.console(rep):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return rep


def main(args: argparse.Namespace, ray_address: str | None = "local") -> int:
    from raytrieve.progress import configure_logging

    configure_logging()
    evaluate(args, ray_address)
    return 0


def _check_index_length(args: argparse.Namespace, lengths: dict[str, int | None]) -> None:
    """--max-seq-length over an --index: the queries are encoded at the length of the index's
    vectors, so the flag does nothing for the retrievers (it ran silently, the report recording
    the flag beside the lengths used); it still sets the --reranker's length."""
    other = {k: n for k, n in lengths.items() if k != "reranker" and n is not None and n != args.max_seq_length}
    if not other:
        return
    encoded = ", ".join(f"{k} {n}" for k, n in sorted(other.items()))
    if args.reranker and not args.reranker_max_seq_length:
        log.warning(
            "--max-seq-length %d sets the --reranker's length only: the --index's vectors were encoded at %s "
            "tokens, and its queries are encoded at that length",
            args.max_seq_length,
            encoded,
        )
        return
    raise ConfigError(
        f"--max-seq-length {args.max_seq_length}: the --index {args.index}'s vectors were encoded at {encoded} tokens, "
        "and queries over an index are encoded at that length, so the flag would change nothing; drop it, or "
        "encode the corpus again at that length (raytrieve encode, then index build)"
    )


def evaluated_lengths(index: str | None, options: RunOptions) -> dict[str, int | None]:
    """Each served field's truncation in this evaluation, for --serve-config's length warning:
    the retrievers' --max-seq-length, or, searching an --index, the length its vectors were
    encoded with (run.index_lists encodes the queries at it); the reranker's own."""
    lengths: dict[str, int | None] = {kind: options.max_seq_length for kind in ("dense", "sparse")}
    if index is not None:
        from raytrieve.index.build import read_source

        source = read_source(index)
        for kind in ("dense", "sparse"):
            built = getattr(source, kind, None)
            if built is not None:
                lengths[kind] = built.max_seq_length
    return lengths | {"reranker": options.reranker_length}
