"""The ``raytrieve`` command.

raytrieve models list              the shipped variants (models/)
raytrieve models path NAME         a local sentence-transformers folder for NAME (last line)
raytrieve train --config X.yaml [key=value ...]
                                   fine-tune on an embedded local Ray (jobs/train.py on a cluster)
raytrieve encode --config X.yaml [key=value ...]
                                   encode a corpus into parquet shards (jobs/encode.py on a cluster)
raytrieve index build --vectors DIR --out DIR [--quantize int8|binary] [--backend exact|faiss]
                                   dense and sparse indices from an encoding job's output
raytrieve mine --config X.yaml [key=value ...]
                                   hard negatives for (query, positive) pairs (jobs/mine.py on a cluster)
raytrieve evaluate --data BEIR_DIR (--dense M | --sparse M | --index DIR | --url URL) [--reranker M] ...
                                   NDCG, MRR, MAP, Recall, Precision per stage with bootstrap intervals
raytrieve serve --config X.yaml [key=value ...]
                                   hybrid search, embeddings and rerank over HTTP (127.0.0.1 by default)
raytrieve data build-pydocs --out DIR [--dev-packages A,B ...]
                                   (query, document) pairs from installed packages' docstrings
raytrieve cache list [--json]     what raytrieve's cache on this machine holds ($RAYTRIEVE_CACHE)
raytrieve cache prune --unused-days N [--dry-run]
                                   delete the cache entries not used for N days
raytrieve docs config-reference    the config reference (docs/config-reference.md), from the config models
raytrieve demo [--config jobs/configs/demo.yaml] [key=value ...]
                                   the main job end to end on real text (what `make demo` runs)
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any

from raytrieve._io import redact
from raytrieve.errors import RaytrieveError
from raytrieve.jobs_entry import add_config_arguments, interrupted, run_job, sigterm_as_interrupt


def _models_list(args: argparse.Namespace) -> int:
    from raytrieve import assets

    rows = [(v.name, v.kind, v.source.package, v.description) for v in assets.variants().values()]
    width = max(len(r[0]) for r in rows)
    for name, kind, package, desc in rows:
        print(f"{name:<{width}}  {kind:<6}  {package:<24}  {desc}")
    return 0


def _models_path(args: argparse.Namespace) -> int:
    from raytrieve.model_ref import shipped_model

    print(shipped_model(args.name))
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _cache_rows(found: list[Any]) -> None:
    """Entries by area, each area headed by what it holds (``cache.AREAS``)."""
    import time

    from raytrieve.cache import AREAS

    now = time.time()
    for area, what in AREAS.items():
        mine = [e for e in found if e.area == area]
        if mine:
            print(f"{area}/ ({what}): {len(mine)}, {_size(sum(e.size for e in mine))}")
        for e in mine:
            note = "  (a killed maker's leftover)" if e.temporary else ""
            print(f"  {_size(e.size):>9}  used {(now - e.last_used) / 86_400:6.1f} days ago  {e.path}{note}")
            if e.origin:
                print(f"  {'':>9}  from {e.origin}")


def _cache_list(args: argparse.Namespace) -> int:
    import json

    from raytrieve import cache
    from raytrieve.assets import cache_dir

    found = list(cache.entries())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "area": e.area,
                        "path": str(e.path),
                        "bytes": e.size,
                        "last_used": e.last_used,
                        "temporary": e.temporary,
                        "origin": e.origin,
                    }
                    for e in found
                ]
            )
        )
        return 0
    print(f"{cache_dir()}: {_entries(len(found))}, {_size(sum(e.size for e in found))}")
    _cache_rows(found)
    return 0


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _cache_prune(args: argparse.Namespace) -> int:
    from raytrieve import cache
    from raytrieve.assets import cache_dir

    try:  # prune refuses NaN, infinity (1e304 days overflows to it in seconds) and below 0
        gone = cache.prune(args.unused_days * 86_400, dry_run=args.dry_run)
    except ValueError:
        print("raytrieve cache prune: error: --unused-days must be a number, 0 or more", file=sys.stderr)
        return 2
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{cache_dir()}: {verb} {_entries(len(gone))} unused for {args.unused_days:g} days, "
        f"{_size(sum(e.size for e in gone))}"
    )
    _cache_rows(gone)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from raytrieve.demo import DemoConfig, load_demo_config, run_demo

    cfg = load_demo_config(args.config, args.overrides) if args.config else DemoConfig().check("demo")
    run_demo(cfg)
    return 0


def _docs_config_reference(args: argparse.Namespace) -> int:
    from raytrieve.config_reference import markdown

    print(markdown())
    return 0


def _job(job: str):
    """A config-driven command (train, encode, mine) on an embedded local Ray."""

    def run(args: argparse.Namespace) -> int:
        return run_job(job, args.config, args.overrides, ray_address="local")

    return run


def _config_command(sub: Any, name: str, help: str, example: str, override: str, func: Any) -> None:
    cmd = sub.add_parser(name, help=help)
    add_config_arguments(cmd, example, override)
    cmd.set_defaults(func=func)


def _index_build(args: argparse.Namespace) -> int:
    import json

    import yaml

    from raytrieve.index.build import IndexOptions, build_indices

    params = {}
    for item in args.faiss_param:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    options = IndexOptions(
        quantize=args.quantize, backend=args.backend, faiss_index=args.faiss_index, faiss_params=params or None
    )
    print(json.dumps(build_indices(args.vectors, args.out, options)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from raytrieve.evaluate.command import main

    return main(args, ray_address="local")


def _serve(args: argparse.Namespace) -> int:
    import time

    from raytrieve.serve.config import load_serve_config

    cfg = load_serve_config(args.config, args.overrides)  # a config error is reported before Ray loads
    from raytrieve.serve.launch import start

    try:
        url = start(cfg, where=args.config, ray_address="local")
        from raytrieve.serve.app import route_list

        print(
            f"raytrieve serve: listening on {url} ({route_list()}); "
            + (f"Serve's proxy on port {cfg.proxy_port}; " if cfg.direct_ingress else "")
            + "Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray

        # The Ray here is this process's own (embedded): stopping it stops every replica at once.
        # serve.shutdown() would first drain each replica gracefully, 15 s and more on 2 cores,
        # for requests that a stopped server will not answer anyway.
        print("raytrieve serve: stopping", file=sys.stderr, flush=True)
        ray.shutdown()
    return 0


def _build_pydocs(args: argparse.Namespace) -> int:
    import json

    from raytrieve.data.pydocs import PACKAGES, SPLITS, build

    def packages(split: str) -> tuple[str, ...]:
        given = tuple(p.strip() for p in (getattr(args, f"{split}_packages") or "").split(",") if p.strip())
        return given or PACKAGES[split]

    train, dev, test = (packages(split) for split in SPLITS)
    built = build(
        args.out, train_packages=train, dev_packages=dev, test_packages=test, max_per_package=args.max_per_package
    )
    print(json.dumps(built))
    return 0


def _beir_pairs(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from raytrieve.data.beir import beir_pairs

    print(json.dumps(asdict(beir_pairs(args.beir, args.split, args.out, args.max_pairs, args.seed))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrieve", description="Retrieval models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="the shipped model catalogue")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list the variants").set_defaults(func=_models_list)
    path = models_sub.add_parser("path", help="print a local sentence-transformers folder for a variant")
    path.add_argument("name")
    path.set_defaults(func=_models_path)
    cache = sub.add_parser("cache", help="raytrieve's cache on this machine ($RAYTRIEVE_CACHE)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    listing = cache_sub.add_parser("list", help="every entry: its area, size, last use and folder")
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    listing.set_defaults(func=_cache_list)
    prune = cache_sub.add_parser(
        "prune", help="delete the entries not used for N days (each is made again when next needed)"
    )
    prune.add_argument("--unused-days", type=float, required=True, metavar="N")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    prune.set_defaults(func=_cache_prune)
    _config_command(
        sub,
        "train",
        "fine-tune a model as a YAML config says, on an embedded Ray",
        "jobs/configs/",
        "training.batch_size=64",
        _job("train"),
    )
    _config_command(
        sub,
        "encode",
        "encode a corpus into parquet shards, on an embedded Ray",
        "jobs/configs/encode_pydocs.yaml",
        "output_dir=out/vectors",
        _job("encode"),
    )
    index = sub.add_parser("index", help="retrieval indices")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="dense and sparse indices from an encoding job's output")
    build.add_argument("--vectors", required=True, help="the encoding job's output_dir")
    build.add_argument("--out", required=True, help="the index folder to write, or a folder URI (replaced whole)")
    build.add_argument(
        "--quantize",
        choices=["int8", "binary"],
        default=None,
        help="search int8/binary codes, rescore with the float vectors (memory-mapped)",
    )
    build.add_argument("--backend", choices=["exact", "faiss"], default="exact")
    build.add_argument("--faiss-index", choices=["flat", "ivf", "hnsw"], default="flat")
    build.add_argument(
        "--faiss-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. nlist=1024, nprobe=16, M=32, ef_search=64",
    )
    build.set_defaults(func=_index_build)
    _config_command(
        sub,
        "mine",
        "mine hard negatives, on an embedded Ray",
        "jobs/configs/mine_pydocs.yaml",
        "selection.num_negatives=5",
        _job("mine"),
    )
    evaluate = sub.add_parser(
        "evaluate", help="retrieval metrics per stage on your corpus, queries and qrels (BEIR layout or files)"
    )
    from raytrieve.evaluate.command import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)
    _config_command(
        sub,
        "serve",
        "serve hybrid retrieval over HTTP, on an embedded Ray",
        "jobs/configs/serve_pydocs.yaml",
        "port=8200",
        _serve,
    )
    data = sub.add_parser("data", help="build training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pydocs = data_sub.add_parser("build-pydocs", help="retrieval pairs from installed packages' docstrings")
    pydocs.add_argument(
        "--out",
        default="data/pydocs",
        help="the folder to write train.parquet, dev.parquet, test.parquet and manifest.json to (default: data/pydocs)",
    )
    pydocs.add_argument(
        "--max-per-package",
        type=int,
        default=4000,
        help="at most this many (summary, docstring) pairs from each package (default: 4000)",
    )
    from raytrieve.data.pydocs import PACKAGES

    for split, default in PACKAGES.items():
        pydocs.add_argument(
            f"--{split}-packages",
            metavar="A,B",
            help=f"the installed packages (import names) of the {split} split (default: {','.join(default)})",
        )
    pydocs.set_defaults(func=_build_pydocs)
    beir = data_sub.add_parser(
        "beir-pairs",
        help="(query, document) training pairs from a BEIR folder's judged split, for raytrieve train",
    )
    beir.add_argument("--beir", required=True, help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    beir.add_argument("--split", default="train", help="the qrels file to read (default: train)")
    beir.add_argument("--out", required=True, help="the parquet file to write (columns query, document)")
    beir.add_argument("--max-pairs", type=int, help="at most this many pairs, whole queries drawn with --seed")
    beir.add_argument("--seed", type=int, default=42)
    beir.set_defaults(func=_beir_pairs)
    docs = sub.add_parser("docs", help="generated documentation")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True)
    docs_sub.add_parser("config-reference", help="print docs/config-reference.md").set_defaults(
        func=_docs_config_reference
    )
    demo = sub.add_parser("demo", help="the main job end to end on real text, on an embedded Ray")
    demo.add_argument("--config", help="a YAML config (jobs/configs/demo.yaml); default: its defaults")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.test_queries=100")
    demo.set_defaults(func=_demo)
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Each subcommand's parser records its own name (``raytrieve data beir-pairs``) as ``prog``,
    so that an error is reported under it, as argparse reports a usage error."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(prog=child.prog, command_parser=child)
                _name_commands(child)


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's "unrecognized arguments", said by the subcommand's own parser (its usage, not
    the top level's), with the closest of its options for a mistyped one."""
    options = [s for action in parser._actions for s in action.option_strings]

    def said(given: str) -> str:
        if not given.startswith("-"):  # a positional or a key=value override left over: as given
            return given
        flag = given.split("=", 1)[0]
        match = difflib.get_close_matches(flag, options, n=1)
        return f"{flag} (did you mean {match[0]}?)" if match else flag

    return f"unrecognized arguments: {' '.join(said(x) for x in extra)}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        own = getattr(args, "command_parser", parser)
        own.error(_unrecognized(own, extra))  # exits 2, as parse_args does
    try:
        with sigterm_as_interrupt():  # SIGTERM ends every command as Ctrl-C does (jobs_entry says why)
            return args.func(args)
    except RaytrieveError as e:
        print(redact(f"{args.prog}: error: {e}"), file=sys.stderr)  # without the keys a URI may hold
        return 2
    except KeyboardInterrupt:  # a line, not a traceback; every job's finished work is kept
        return interrupted(args.prog)


if __name__ == "__main__":
    sys.exit(main())
