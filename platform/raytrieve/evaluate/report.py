"""The evaluation's report: metrics per stage, paired bootstrap intervals between stages and
against an earlier run, as a dict (evaluation.json), console lines, markdown and a chart.

Intervals: each stage against the best single first stage (by the primary metric, NDCG@k),
and the reranked stage against the fused one. ``--compare previous.json`` pairs this run's
per-query values with the earlier run's by query id, stage by stage.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raytrieve.errors import DataError
from raytrieve.evaluate import scoring
from raytrieve.evaluate.run import FUSED, RERANKED, TUNED, TUNED_RERANK, Rankings

log = logging.getLogger("raytrieve.evaluate")

FORMAT, VERSION = "raytrieve-evaluate", 1
ORDER = {"dense": 0, "sparse": 1, FUSED: 2, RERANKED: 3, TUNED: 4, TUNED_RERANK: 5}


def metric_names(k: int, recall_k: int) -> list[str]:
    names = [f"ndcg@{k}", f"mrr@{k}", f"map@{k}", f"recall@{k}", f"precision@{k}"]
    return names + ([f"recall@{recall_k}"] if recall_k != k else [])


def _interval(a: Sequence[float], b: Sequence[float], rounds: int) -> dict[str, Any]:
    delta, lo, hi = scoring.paired_interval(a, b, rounds=rounds)
    return {"delta": delta, "ci95": [lo, hi]}


def build(
    rankings: Rankings,
    qrels: Mapping[str, Mapping[str, float]],
    k: int,
    recall_k: int,
    info: Mapping[str, Any],
    rounds: int = 2000,
) -> dict[str, Any]:
    """The report of ``rankings`` (stage -> query id -> ranked doc ids). ``info``: data,
    models, settings and timings, stored as they are."""
    names = metric_names(k, recall_k)
    qids = sorted(qrels)
    stages = sorted(rankings, key=lambda s: (ORDER.get(s.split(":")[0], 1), s))
    values = {s: scoring.per_query(rankings[s], qrels, names) for s in stages}
    primary = names[0]
    first = [s for s in stages if s not in (FUSED, RERANKED, TUNED, TUNED_RERANK)]
    best = max(first, key=lambda s: (scoring.mean(values[s][primary]), -stages.index(s))) if first else None
    pairs = [(best, s) for s in stages if best is not None and s != best]
    if FUSED in values and RERANKED in values:
        pairs.append((FUSED, RERANKED))
    if FUSED in values and TUNED in values:  # the fitted setting against the untuned fusion
        pairs.append((FUSED, TUNED))
    if TUNED in values and TUNED_RERANK in values:  # the rerank the fit kept off, against the fit
        pairs.append((TUNED, TUNED_RERANK))
    comparisons = [
        {
            "stage": s,
            "baseline": base,
            "metrics": {m: _interval(values[base][m], values[s][m], rounds) for m in names},
        }
        for base, s in pairs
        if base is not None
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **info,
        "metrics": names,
        "primary_metric": primary,
        "stages": {s: {m: scoring.mean(values[s][m]) for m in names} for s in stages},
        "best_first_stage": best,
        "comparisons": comparisons,
        "per_query": {s: {m: dict(zip(qids, values[s][m])) for m in names} for s in stages},
    }


def load_previous(path: str | Path) -> dict[str, Any]:
    import json

    path = Path(path)
    if path.is_dir():
        inside = path / "evaluation.json"
        hint = f"; {inside} is there: pass it" if inside.is_file() else ""
        raise DataError(f"{path}: is a folder; --compare takes the evaluation.json of an earlier run{hint}")
    if not path.is_file():
        raise DataError(f"{path}: no such file; --compare takes the evaluation.json of an earlier run")
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        fix = "pass an evaluation.json that raytrieve evaluate wrote"
        raise DataError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(previous, dict) or previous.get("format") != FORMAT or "per_query" not in previous:
        raise DataError(f"{path}: not an evaluation.json of raytrieve evaluate (format {FORMAT!r} with per_query)")
    if previous.get("version") != VERSION:
        raise DataError(f"{path}: report version {previous.get('version')!r}, this raytrieve reads {VERSION}; rerun it")
    return previous


def check_comparable(
    previous: dict[str, Any],
    where: str,
    k: int,
    recall_k: int,
    prints: Mapping[str, Any],
    stages: Sequence[str] | None = None,
) -> None:
    """``--compare``'s run measured this run's primary metric (the same --k), on some of this
    run's queries, with the same texts and judgements (``prints``: data.fingerprints), and, when
    this run's ``stages`` are known before it runs, on a stage of the same name: refused before
    any model loads, not found out after encoding."""
    names = metric_names(k, recall_k)
    if names[0] not in previous.get("metrics", []):  # the primary metric, which the comparison reports
        raise DataError(
            f"{where}: its metrics are {previous.get('metrics')}, this run's {names}; compare runs with the same --k"
        )
    per_stage = previous["per_query"]
    if stages is not None and not set(stages) & set(per_stage):
        raise DataError(
            f"{where}: shares no stage with this run (its stages {sorted(per_stage)}, this run's {sorted(stages)}); "
            "compare runs with the same models' kinds"
        )
    theirs = set(next(iter(per_stage.values()))[names[0]]) if per_stage else set()
    common = sorted(theirs & set(prints["queries"]))
    if not common:
        raise DataError(f"{where}: no query id in common with this run; compare runs on the same queries")
    kept = previous.get("data_fingerprints")
    if not isinstance(kept, dict):
        log.warning("--compare: %s was written by an older raytrieve: its queries are paired by id alone", where)
        return
    other = [q for q in common if kept.get("queries", {}).get(q) != prints["queries"][q]]
    if other:
        files = (previous.get("data") or {}).get("files")
        raise DataError(
            f"{where}: {len(other)} of the {len(common)} query ids both runs scored have another text or other "
            f"judgements there, e.g. {other[:5]}: it was scored on other data"
            + (f" ({', '.join(f'{k} {v}' for k, v in files.items())})" if isinstance(files, dict) else "")
            + "; compare runs on the same queries and qrels"
        )
    if kept.get("corpus") != prints["corpus"]:
        log.warning(
            "--compare: %s searched another corpus (other ids or texts): the differences include the corpus's", where
        )


def compare(report: dict[str, Any], previous: dict[str, Any], where: str, rounds: int = 2000) -> dict[str, Any]:
    """This run against ``previous`` (delta = this − previous) on the stages and metrics both
    have, over the queries both scored (paired by id)."""
    stages = [s for s in report["per_query"] if s in previous["per_query"]]
    names = [m for m in report["metrics"] if m in previous.get("metrics", [])]
    if not stages or not names:
        raise DataError(
            f"{where}: shares no stage or metric with this run (its stages {sorted(previous['per_query'])}, "
            f"metrics {previous.get('metrics')}); compare runs with the same models' kinds and --k"
        )
    here = set(report["per_query"][stages[0]][names[0]])
    there = set(previous["per_query"][stages[0]][names[0]])
    common = sorted(here & there)
    if not common:
        raise DataError(f"{where}: no query id in common with this run; compare runs on the same queries")
    if here != there:
        log.info(
            "--compare: %d queries in both runs, %d only here, %d only in %s",
            len(common),
            len(here - there),
            len(there - here),
            where,
        )
    out: dict[str, Any] = {}
    for s in stages:
        out[s] = {}
        for m in names:
            now = [report["per_query"][s][m][q] for q in common]
            before = [float(previous["per_query"][s][m][q]) for q in common]
            out[s][m] = {
                "previous": scoring.mean(before),
                "current": scoring.mean(now),
                **_interval(before, now, rounds),
            }
    kept, now = previous.get("data_fingerprints"), report.get("data_fingerprints")
    differences = run_differences(report, previous)
    if differences:
        log.warning(
            "--compare: %s ran with other %s than this run; its stages are paired by name (a fused stage of "
            "another fusion, a reranked one of another depth), so a delta includes those changes",
            where,
            ", ".join(differences),
        )
    return {
        "previous": where,
        "previous_name": previous.get("name"),
        # None: a run of an older raytrieve, whose corpus cannot be told
        "same_corpus": kept.get("corpus") == now.get("corpus") if isinstance(kept, dict) and now else None,
        "queries": len(common),
        "only_here": len(here - there),
        "only_previous": len(there - here),
        "stages": out,
        "differences": differences,
    }


# What shapes a stage's rankings, beside the data: the keys whose values two compared runs are
# checked for (settings' k, recall_k and bootstrap_rounds only change what is measured).
_UNMEASURED = ("k", "recall_k", "bootstrap_rounds")


def run_differences(report: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {"previous": .., "current": ..}}`` for each model, backend, setting and fitted
    setting in which the two runs differ; a key only one run records (an older report) is left out."""

    def flat(rep: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": rep.get("backend"), "models": rep.get("models")}
        settings = rep.get("settings")
        if isinstance(settings, Mapping):
            out |= {f"settings.{k}": v for k, v in settings.items() if k not in _UNMEASURED}
        tuning = rep.get("tuning")
        if isinstance(tuning, Mapping):
            out["tuning.setting"] = tuning.get("setting")
        return {k: v for k, v in out.items() if k in rep or k.split(".")[0] in rep}

    here, there = flat(report), flat(previous)
    out = {
        key: {"previous": there[key], "current": here[key]} for key in here if key in there and here[key] != there[key]
    }
    used_here, used_there = here.get("settings.dtypes_used"), there.get("settings.dtypes_used")
    if isinstance(used_here, Mapping) and isinstance(used_there, Mapping):
        # Keyed by stage, and only stages of one name are paired: one run's other stages (or
        # another naming of them) are no difference in what a paired delta measured.
        both = used_here.keys() & used_there.keys()
        if all(used_here[s] == used_there[s] for s in both):
            out.pop("settings.dtypes_used", None)
            if both:  # asked differently (auto, float32), computed alike
                out.pop("settings.dtype", None)
    return out


def _ci(v: Mapping[str, Any]) -> str:
    lo, hi = v["ci95"]
    return f"{v['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def console(rep: Mapping[str, Any]) -> list[str]:
    names, stages = rep["metrics"], rep["stages"]
    width = max(len(s) for s in stages) + 2
    out = ["", "stage".ljust(width) + "".join(f"{m:>13}" for m in names)]
    out += [s.ljust(width) + "".join(f"{stages[s][m]:>13.4f}" for m in names) for s in stages]
    primary = rep["primary_metric"]
    for c in rep["comparisons"]:
        out.append(f"{c['stage']} − {c['baseline']}: {primary} {_ci(c['metrics'][primary])}")
    if "compare" in rep:
        cmp = rep["compare"]
        other = ", on another corpus" if cmp.get("same_corpus") is False else ""
        out.append(f"against {cmp['previous']} ({cmp['queries']} queries in both{other}), {primary}:")
        if cmp.get("differences"):
            out.append(f"  (that run differs in {', '.join(cmp['differences'])}; stages are paired by name)")
        out += [
            f"  {s}: {v[primary]['previous']:.4f} -> {v[primary]['current']:.4f}  {_ci(v[primary])}"
            for s, v in cmp["stages"].items()
            if primary in v
        ]
    return out


def markdown(rep: Mapping[str, Any]) -> str:
    names, data = rep["metrics"], rep.get("data", {})
    lines = [
        f"# Retrieval evaluation{': ' + rep['name'] if rep.get('name') else ''}",
        "",
        f"{rep['created']}; {data.get('queries', '?')} queries with a relevant document over "
        f"{data.get('documents', '?')} documents"
        + (f" (split {data['split']})" if data.get("split") else "")
        + f"; rankings from {rep.get('backend', '?')}.",
        "",
        "| stage | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {s} | " + " | ".join(f"{v[m]:.4f}" for m in names) + " |" for s, v in rep["stages"].items()]
    if rep["comparisons"]:
        lines += [
            "",
            "Differences between stages on the same queries (stage − baseline), with paired bootstrap 95% intervals; "
            "an interval that contains 0 is no difference this many queries can show:",
            "",
            "| stage − baseline | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        lines += [
            f"| {c['stage']} − {c['baseline']} | " + " | ".join(_ci(c["metrics"][m]) for m in names) + " |"
            for c in rep["comparisons"]
        ]
    if "compare" in rep:
        cmp = rep["compare"]
        shown = [m for m in names if any(m in v for v in cmp["stages"].values())]
        lines += [
            "",
            f"Against `{cmp['previous']}`{' (' + cmp['previous_name'] + ')' if cmp.get('previous_name') else ''}, "
            f"on the {cmp['queries']} queries both scored (this − previous)"
            + (", each run over its own corpus" if cmp.get("same_corpus") is False else "")
            + ":",
            "",
            "| stage | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        lines += [
            f"| {s} | " + " | ".join(_ci(v[m]) if m in v else "" for m in shown) + " |"
            for s, v in cmp["stages"].items()
        ]
        if cmp.get("differences"):
            lines += ["", "The stages are paired by name; the runs differ in:", ""]
            lines += [
                f"- `{key}`: `{json.dumps(v['previous'])}` then, `{json.dumps(v['current'])}` now"
                for key, v in cmp["differences"].items()
            ]
    return "\n".join(lines) + "\n"


def chart(rep: Mapping[str, Any], path: Path) -> None:
    """A bar chart of every stage's metrics (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    names, stages = rep["metrics"], list(rep["stages"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names) * max(1, len(stages)) / 3, 4.2))
    x, width = np.arange(len(names)), 0.8 / max(1, len(stages))
    for i, s in enumerate(stages):
        ax.bar(x + (i - (len(stages) - 1) / 2) * width, [rep["stages"][s][m] for m in names], width, label=s)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"raytrieve evaluate{': ' + rep['name'] if rep.get('name') else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(rep: dict[str, Any], out: Path, with_chart: bool = True) -> list[Path]:
    """evaluation.json, evaluation.md and (with matplotlib) evaluation.png in ``out``, each atomically."""
    from raytrieve._io import atomic_file, write_json

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "evaluation.json", out / "evaluation.md"]
    write_json(written[0], rep)
    drew = with_chart and importlib.util.find_spec("matplotlib") is not None
    if drew:
        with atomic_file(out / "evaluation.png") as tmp:
            chart(rep, tmp)
        written.append(out / "evaluation.png")
    elif with_chart:
        log.info("matplotlib is not installed: no chart (pip install matplotlib to get evaluation.png)")
    with atomic_file(written[1]) as tmp:
        tmp.write_text(markdown(rep) + ("\n![metrics per stage](evaluation.png)\n" if drew else ""))
    return written
