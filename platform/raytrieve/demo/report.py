"""The demo's report: stage x metric before and after fine-tuning, with paired 95% bootstrap
intervals, as a dict (report.json), console lines, markdown and a PNG bar chart."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from raytrieve.demo import scoring
from raytrieve.demo.config import DemoConfig
from raytrieve.demo.sample import Samples

TEST_STAGES = ("dense", "sparse", "hybrid", "hybrid+rerank", "fitted", "fitted+rerank")
LABELS = {
    "dense": "dense (MiniLM)",
    "sparse": "sparse (SPLADE)",
    "hybrid": "hybrid (RRF)",
    "hybrid+rerank": "hybrid + rerank",
    "fitted": "/search fitted on dev",
    "fitted+rerank": "/search fitted + rerank",
}


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU"
        if not torch.cuda.is_available()
        else f"{platform.system()} {cpu}, {torch.cuda.get_device_name(0)}"
    )


def _row(
    split: str,
    stage: str,
    label: str,
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    names: tuple[str, ...],
) -> dict[str, Any]:
    metrics = {}
    for m in names:
        delta, lo, hi = scoring.paired_interval(before[m], after[m])
        metrics[m] = {
            "before": scoring.mean(before[m]),
            "after": scoring.mean(after[m]),
            "delta": delta,
            "ci95": [lo, hi],
        }
    return {"split": split, "stage": stage, "label": label, "metrics": metrics}


def build(
    cfg: DemoConfig,
    samples: Samples,
    before_dev: dict,
    after_dev: dict,
    before_test: dict,
    after_test: dict,
    tuned: dict[str, dict],
    fitted: dict[str, dict | None],
    seconds: float,
    reused: list[str],
) -> dict[str, Any]:
    names = scoring.metric_names(cfg.serving.recall)
    rows = [
        _row("test", s, LABELS[s], before_test["per_stage"][s], after_test["per_stage"][s], names) for s in TEST_STAGES
    ]
    for kind in ("dense", "sparse"):
        rows.append(_row("dev", kind, LABELS[kind], before_dev[kind]["per_query"], after_dev[kind]["per_query"], names))
    # Does the full pipeline beat each single stage, on the same queries?
    rerank_vs = {}
    for phase, result in (("before", before_test), ("after", after_test)):
        full = result["per_stage"]["hybrid+rerank"]["ndcg@10"]
        for stage in ("dense", "sparse", "hybrid"):
            delta, lo, hi = scoring.paired_interval(result["per_stage"][stage]["ndcg@10"], full)
            rerank_vs[f"{phase}:{stage}"] = {"delta": delta, "ci95": [lo, hi]}
    # The fitted /search, and the same with the dev's best rerank, against every other stage and
    # the better single retriever (held out).
    fitted_vs = _versus(before_test, after_test, "fitted", ("dense", "sparse", "hybrid", "hybrid+rerank"))
    fitted_rerank_vs = _versus(before_test, after_test, "fitted+rerank", ("dense", "sparse", "hybrid", "fitted"))
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": _machine(),
        "seconds": round(seconds, 1),
        "reused_steps": list(reused),
        "metrics": list(names),
        # What the splits are (the markdown's words; a report without it is of the pydocs set).
        "data": {"pydocs": samples.pydocs}
        if cfg.beir is None
        else {"beir": cfg.beir.model_dump(), "dev_note": samples.dev_note},
        "sizes": {
            "train_pairs": samples.train_pairs,
            "dev_queries": len(samples.dev.queries),
            "dev_corpus": len(samples.dev.corpus),
            "test_queries": len(samples.test.queries),
            "test_corpus": len(samples.test.corpus),
            "rerank_depth": cfg.serving.rerank_depth,
            "recall": cfg.serving.recall,
            "clients": cfg.serving.clients,
            "max_seq_length": cfg.models.max_seq_length,
            "reranker_max_seq_length": cfg.models.reranker_max_seq_length,
        },
        "models": {
            "pretrained": {"dense": cfg.models.dense, "sparse": cfg.models.sparse, "cross": cfg.models.reranker},
            "fine_tuned": {k: v["uri"] for k, v in tuned.items()},
            "reranker": cfg.models.reranker,
        },
        "mlflow": {"tracking_uri": cfg.tracking_uri(), "runs": {k: v.get("run_id") for k, v in tuned.items()}},
        "timings_p50_ms": {"before": before_test["timings_p50_ms"], "after": after_test["timings_p50_ms"]},
        # Stage results saved by a run before this field existed lack it (reused steps): null.
        "served_models": {"before": before_test.get("served_models"), "after": after_test.get("served_models")},
        "encode_rows_per_s": {
            "before": before_test["encode"]["rows_per_s"],
            "after": after_test["encode"]["rows_per_s"],
        },
        "rows": rows,
        "rerank_vs_single_stage_ndcg@10": rerank_vs,
        "fitted_search": fitted,
        "fitted_vs_stage_ndcg@10": fitted_vs,
        "fitted_rerank_vs_stage_ndcg@10": fitted_rerank_vs,
        "lee_spearman": {"before": before_dev["dense"]["lee_spearman"], "after": after_dev["dense"]["lee_spearman"]},
    }


def _versus(before_test: dict, after_test: dict, full: str, stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """NDCG@10 of test stage ``full`` − each of ``stages`` per phase ("before:dense", ...), paired,
    and against the better single retriever of that phase ("before:best_single", with its name)."""
    out: dict[str, dict[str, Any]] = {}
    for phase, result in (("before", before_test), ("after", after_test)):
        ndcg = {stage: result["per_stage"][stage]["ndcg@10"] for stage in TEST_STAGES}
        best_single = max(("dense", "sparse"), key=lambda st: scoring.mean(ndcg[st]))
        for stage in stages:
            delta, lo, hi = scoring.paired_interval(ndcg[stage], ndcg[full])
            out[f"{phase}:{stage}"] = {"delta": delta, "ci95": [lo, hi]}
        out[f"{phase}:best_single"] = {**out[f"{phase}:{best_single}"], "stage": best_single}
    return out


def _cell(v: dict[str, Any]) -> str:
    lo, hi = v["ci95"]
    return f"{v['before']:.3f} | {v['after']:.3f} | {v['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(rep: dict[str, Any]) -> str:
    names, s = rep["metrics"], rep["sizes"]
    head = " | ".join(f"{m} before | {m} after | Δ [95% CI]" for m in names)
    data = rep.get("data")
    if data is None:  # the pydocs set, in a report of before its rules 3 (no dev packages)
        test = "queries of numpy and scipy docstrings (packages never trained on)"
        dev = "held-out pairs of the train packages"
    elif "pydocs" in data:
        packages = data["pydocs"]
        test = f"queries of {' and '.join(packages['test_packages'])} docstrings (packages never trained on)"
        dev = f"queries of {' and '.join(packages['dev_packages'])} docstrings (packages neither trained on nor tested)"
    else:
        b = data["beir"]
        test = f"queries of {b['path']}'s {b['test_split']} split (never trained on)"
        # A held-out part of train when the folder has no dev split (demo/sample.py).
        dev = data.get("dev_note") or f"queries of its {b['dev_split'] or 'dev'} split"
    lines = [
        "# raytrieve demo results",
        "",
        f"Run ended {rep['date']}, {rep['machine']}; `raytrieve demo` took {rep['seconds'] / 60:.1f} min"
        + (
            f" (reusing {len(rep['reused_steps'])} finished steps of an earlier run: {', '.join(rep['reused_steps'])})."
            if rep["reused_steps"]
            else ", every step computed in this run."
        ),
        "",
        f"- **test**: {s['test_queries']} {test} over "
        f"{s['test_corpus']} documents, encoded by the Ray Data encoding job and asked over HTTP to Ray Serve's "
        f"`/search`; rerank rescores the top {s['rerank_depth']} fused candidates with the cross-encoder "
        f"({rep['models']['pretrained']['cross']} before, {rep['models']['fine_tuned']['cross']} after)"
        f"; texts are cut at {s['max_seq_length']} tokens, the reranker's query and document together at "
        f"{s['reranker_max_seq_length']}.",
        f"- **dev** (where `/search` is fitted): {s['dev_queries']} {dev} over {s['dev_corpus']} documents, "
        "scored in process.",
        f"- **before**: {rep['models']['pretrained']['dense']} and {rep['models']['pretrained']['sparse']}; "
        f"**after**: fine-tuned on {s['train_pairs']} pairs with Ray Train and served from the MLflow registry "
        f"({', '.join(rep['models']['fine_tuned'].values())}).",
        "- Δ = after − before, with a paired bootstrap 95% interval over the queries: an interval that contains 0 "
        "means no difference that this many queries can show.",
        "",
        f"| split | stage | {head} |",
        "|---|---|" + "---|---|---|" * len(names),
    ]
    for row in rep["rows"]:
        lines.append(
            f"| {row['split']} | {row['label']} | " + " | ".join(_cell(row["metrics"][m]) for m in names) + " |"
        )
    lines += ["", "Full pipeline against each single stage (test, NDCG@10, hybrid + rerank − stage):", ""]
    lines += ["| models | vs dense | vs sparse | vs hybrid |", "|---|---|---|---|"]
    for phase in ("before", "after"):
        cells = []
        for stage in ("dense", "sparse", "hybrid"):
            v = rep["rerank_vs_single_stage_ndcg@10"][f"{phase}:{stage}"]
            cells.append(f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]")
        lines.append(f"| {'pretrained' if phase == 'before' else 'fine-tuned'} | " + " | ".join(cells) + " |")
    lines += _fitted_lines(rep)
    lee = rep["lee_spearman"]
    lines += [
        "",
        f"Lee corpus (50 news documents, human similarity judgments), Spearman of the dense model's cosine: "
        f"{lee['before']:.3f} before, {lee['after']:.3f} after.",
        "",
        "Serve timings, median per /search call (whole pipeline with rerank, "
        + str(s["clients"])
        + " concurrent clients, ms before / after): "
        + ", ".join(_timing_cells(rep["timings_p50_ms"]))
        + ".",
        f"Encoding job: {rep['encode_rows_per_s']['before']} / {rep['encode_rows_per_s']['after']} documents/s "
        "(dense and sparse in one pass, actor start-up included).",
        *_served_lines(rep.get("served_models") or {}),
        "",
    ]
    return "\n".join(lines)


def _served_lines(served: dict[str, Any]) -> list[str]:
    """What each phase's replicas ran (dtype auto resolved on the replica, threads, output cache):
    timings differ with it. Nothing for a phase reused from a run that did not record it."""
    cache = lambda m: f", cache {m['cache_entries']:,}" if m.get("cache_entries") else ""
    return [
        f"Served {phase}: "
        + "; ".join(
            f"{name} ({m['kind']}) {m['dtype']}, {m['backend']}, {m['torch_threads']} threads{cache(m)}"
            for name, m in models.items()
        )
        + "."
        for phase, models in served.items()
        if models
    ]


def _timing_cells(timings: dict[str, dict[str, float]]) -> list[str]:
    """ "stage before / after" per stage either phase timed; a stage that did not run in a phase
    (lookup_ms: only searches whose texts did not all come along with the recall) shows "-"."""
    stages = dict.fromkeys([*timings["before"], *timings["after"]])
    cell = lambda phase, k: f"{timings[phase][k]:.0f}" if k in timings[phase] else "-"
    return [f"{k.removesuffix('_ms')} {cell('before', k)} / {cell('after', k)}" for k in stages]


def _fitted_lines(rep: dict[str, Any]) -> list[str]:
    """The /search settings fitted on dev per phase, and their test figure against each stage."""
    lines = ["", "`/search` with the settings fitted on the dev split (test, NDCG@10, fitted − stage):", ""]
    lines += ["| models | fitted on dev | vs dense | vs sparse | vs hybrid (RRF) | vs hybrid + rerank |"]
    lines += ["|---|---|---|---|---|---|"]
    for phase in ("before", "after"):
        fit = rep["fitted_search"].get(phase)
        cells = []
        for stage in ("dense", "sparse", "hybrid", "hybrid+rerank"):
            v = rep["fitted_vs_stage_ndcg@10"][f"{phase}:{stage}"]
            cells.append(f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]")
        label = fit["label"] if fit else "(not fitted: the serve config's search:)"
        lines.append(f"| {'pretrained' if phase == 'before' else 'fine-tuned'} | {label} | " + " | ".join(cells) + " |")
    if "fitted_rerank_vs_stage_ndcg@10" not in rep:  # a report written before this table existed
        return lines
    lines += [
        "",
        "`/search` fitted on dev with the reranker on: the fitted recall and fusion, reranked at the depth and "
        "weight that scored best on dev, whether or not the fit adopted it (test, NDCG@10, fitted + rerank − stage):",
        "",
        "| models | setting | on dev, cross-fitted: vs no rerank (adopted?) | vs dense | vs sparse | vs hybrid (RRF) "
        "| vs /search fitted |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in ("before", "after"):
        fit = rep["fitted_search"].get(phase) or {}
        cells = []
        for stage in ("dense", "sparse", "hybrid", "fitted"):
            v = rep["fitted_rerank_vs_stage_ndcg@10"][f"{phase}:{stage}"]
            cells.append(f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]")
        lines.append(
            f"| {'pretrained' if phase == 'before' else 'fine-tuned'} | {_rerank_setting(fit, rep)} | "
            f"{_dev_gain(fit)} | " + " | ".join(cells) + " |"
        )
    return lines


def _rerank_setting(fit: dict[str, Any], rep: dict[str, Any]) -> str:
    """The "fitted+rerank" stage's setting in words (fusion_fit.rerank_request's choice)."""
    if fit.get("setting", {}).get("rerank"):
        return fit["label"]
    if fit.get("with_rerank"):
        return fit["with_rerank"]["label"]
    fitted = fit["label"] if fit else "the serve config's search:"
    return f"{fitted}, rerank@{rep['sizes']['rerank_depth']}"


def _dev_gain(fit: dict[str, Any]) -> str:
    """The dev gain the fit decided by: cross-fitted (serve/tuning.py), or in-sample in a report
    written before that existed."""
    gain = fit.get("rerank_gain")
    if not gain:
        return "-"
    decided = gain.get("cross_fitted", gain)
    lo, hi = decided["ci95"]
    return f"{decided['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({'yes' if gain['adopted'] else 'no'})"


def console(rep: dict[str, Any]) -> list[str]:
    names = rep["metrics"]
    width = max(len(f"{r['split']}  {r['label']}") for r in rep["rows"]) + 2
    out = [
        "",
        "".ljust(width) + "".join(f"{m:>24}" for m in names),
        "".ljust(width) + "".join(f"{'before -> after':>24}" for _ in names),
    ]
    for r in rep["rows"]:
        cells = "".join(f"{r['metrics'][m]['before']:>12.3f} -> {r['metrics'][m]['after']:.3f}  " for m in names)
        out.append(f"{r['split']}  {r['label']}".ljust(width) + cells)
    lee = rep["lee_spearman"]
    out.append(f"Lee Spearman (dense): {lee['before']:.3f} -> {lee['after']:.3f}")
    return out


def chart(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    names = rep["metrics"]
    rows = rep["rows"]
    labels = [f"{r['split']}\n{r['label']}" for r in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.8), sharey=True)
    x = np.arange(len(rows))
    for ax, m in zip(np.atleast_1d(axes), names):
        ax.bar(x - 0.2, [r["metrics"][m]["before"] for r in rows], 0.4, label="pretrained", color="#9aa5b1")
        ax.bar(x + 0.2, [r["metrics"][m]["after"] for r in rows], 0.4, label="fine-tuned", color="#2b6cb0")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(m)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(loc="upper left")
    fig.suptitle(f"raytrieve demo, {rep['date']} ({rep['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(rep: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """report.json, results.md and results.png in ``out``, each written atomically."""
    from raytrieve._io import atomic_file, write_json

    write_json(out / "report.json", rep)
    md, png = out / "results.md", out / "results.png"
    with atomic_file(md) as tmp:
        tmp.write_text(markdown(rep) + "\n![before and after fine-tuning](results.png)\n")
    with atomic_file(png) as tmp:
        chart(rep, tmp)
    return md, png
