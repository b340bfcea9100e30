"""The model card of a trained model: ``README.md`` in the saved folder, in the shape
sentence-transformers gives its cards (YAML front matter for the Hub, then markdown).

``render(facts)`` is a pure function of ``CardFacts``, plain data that the training run
gathers (``raytrieve.train.card_facts``: the driver the data and config, rank 0 the hardware,
time, evaluation and the model itself). No torch, Ray or MLflow here: the facts travel to the
workers inside the WorkerSpec that Ray Train's controller unpickles.

The card sits next to ``train_config.yaml`` (the resolved config, which reproduces the run).
sentence-transformers reads README.md as text only, so the folder stays loadable by it.

Longer than the house's ~400 lines on purpose: it is one template, mostly the card's own text,
section by section; split, each half would need the other's formatting helpers and facts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

CARD_FILE = "README.md"
CONFIG_FILE = "train_config.yaml"
EXAMPLE_ROWS = 3
EXAMPLE_CHARS = 120  # per text in the examples table
EXAMPLE_ITEMS = 3  # per list value (a listwise row's documents)


@dataclass(frozen=True)
class CardKind:
    """What a card says per model kind: Hub metadata and the classes that load the folder."""

    pipeline_tag: str
    tags: tuple[str, ...]
    raytrieve_class: str
    st_class: str
    what: str  # the kind in words


CARD_KINDS = {
    "dense": CardKind(
        "sentence-similarity",
        ("sentence-transformers", "sentence-similarity", "feature-extraction", "dense"),
        "DenseEncoder",
        "SentenceTransformer",
        "dense bi-encoder",
    ),
    "sparse": CardKind(
        "feature-extraction",
        ("sentence-transformers", "sparse-encoder", "sparse", "splade"),
        "SparseEncoder",
        "SparseEncoder",
        "sparse (SPLADE) encoder",
    ),
    "cross": CardKind(
        "text-ranking",
        ("sentence-transformers", "cross-encoder", "reranker"),
        "CrossEncoder",
        "CrossEncoder",
        "cross-encoder reranker",
    ),
}


@dataclass
class DatasetFacts:
    name: str
    path: str
    format: str
    rows: int
    columns: list[str]  # in the loss's order, the label column last
    label_column: str | None
    loss: dict[str, Any]  # the dataset's LossSpec as given (name, args, inner, matryoshka_*)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first rows, as read
    prompts: dict[str, str] | str | None = None
    weight: float = 1.0


@dataclass
class EvalFacts:
    split: str  # the eval file's name without suffix ("test", "dev")
    path: str
    evaluator: str
    rows: int
    step: int | None = None  # the step of the metrics below (the last evaluation)
    metrics: dict[str, float] = field(default_factory=dict)
    primary_metric: str | None = None


@dataclass
class HardwareFacts:
    accelerator: str  # "cpu" or "cuda"
    device_name: str  # the GPU's or the CPU's model name
    workers: int
    threads_per_worker: int | None
    strategy: str  # ddp | fsdp
    precision: str  # what the matrix products ran in
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, ray, python


@dataclass
class ModelFacts:
    stack: list[str]
    max_seq_length: int | None
    dimension: int | None  # the embedding width (dense), vocabulary (sparse), labels (cross)
    similarity: str | None
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class CardFacts:
    kind: str
    name: str
    base_model: str  # the reference the config gave: a variant, a folder or an MLflow URI
    base_model_id: str | None  # the upstream Hub id where known ("sentence-transformers/all-MiniLM-L6-v2")
    license: str | None  # as the base model states it
    datasets: list[DatasetFacts]
    config: dict[str, Any]  # the resolved training config
    steps: int
    epochs: int
    samples_per_step: int  # global rows per optimizer step
    evaluation: EvalFacts | None = None
    hardware: HardwareFacts | None = None
    model: ModelFacts | None = None
    started: float | None = None  # time.time() when the job started (the driver's clock)
    wall_time_s: float | None = None  # job start to the final model written
    output_dir: str = ""
    run_id: str | None = None
    experiment: str | None = None
    register_as: str | None = None
    raytrieve_version: str = ""


# -- formatting ---------------------------------------------------------------------------


def number(value: Any) -> str:
    """Counts with thousands separators, metrics to 4 decimals, rates like 2e-05 kept short."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {s:02d} s"


def truncate(text: str, limit: int = EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())  # a table cell is one line
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def example_value(value: Any) -> str:
    if isinstance(value, str):
        return truncate(value)
    if isinstance(value, (list, tuple)):
        shown = [example_value(v) for v in value[:EXAMPLE_ITEMS]]
        more = f", … ({len(value)} in all)" if len(value) > EXAMPLE_ITEMS else ""
        return "[" + ", ".join(shown) + more + "]"
    return number(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def value_type(values: list[Any]) -> str:
    """The type of a column from its example values, in words."""
    types = {
        "string" if isinstance(v, str) else "list" if isinstance(v, (list, tuple)) else type(v).__name__
        for v in values
        if v is not None
    }
    return ", ".join(sorted(types)) or "unknown"


# -- the parts ----------------------------------------------------------------------------


def loss_name(spec: dict[str, Any]) -> str:
    """``SpladeLoss(SparseMultipleNegativesRankingLoss)``: a wrapping loss with its base."""
    inner = spec.get("inner") or (spec.get("args") or {}).get("loss")
    if isinstance(inner, str):  # a base loss by name alone
        inner = {"name": inner}
    name = str(spec.get("name"))
    if spec.get("matryoshka_dims"):
        name = f"MatryoshkaLoss({name})"
    return f"{name}({loss_name(inner)})" if isinstance(inner, dict) else name


def _loss_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without empty fields, for the card."""
    out: dict[str, Any] = {"name": spec.get("name")}
    for key in ("args", "matryoshka_dims", "matryoshka_weights"):
        if spec.get(key):
            out[key] = spec[key]
    if isinstance(spec.get("inner"), dict):
        out["inner"] = _loss_arguments(spec["inner"])
    return out


def license_id(license_text: str | None) -> str | None:
    """The Hub's license key from a stated license: ``Apache-2.0 (model), MIT (wrapper)`` -> apache-2.0."""
    if not license_text:
        return None
    first = license_text.strip().split()[0].rstrip(",;")
    return first.lower() or None


def summary(f: CardFacts) -> str:
    """One line: what the model is, what it was trained on, and its evaluation."""
    kind = CARD_KINDS[f.kind].what if f.kind in CARD_KINDS else f"{f.kind} model"
    rows = sum(d.rows for d in f.datasets)
    names = ", ".join(d.name for d in f.datasets)
    losses = ", ".join(sorted({loss_name(d.loss) for d in f.datasets}))
    line = (
        f"A {kind} fine-tuned from {f.base_model_id or f.base_model} with raytrieve on {number(rows)} rows "
        f"({names}), {losses}, {number(f.steps)} steps"
    )
    ev = f.evaluation
    if ev is not None and ev.primary_metric and ev.primary_metric in ev.metrics:
        line += f"; {ev.primary_metric} {number(ev.metrics[ev.primary_metric])} on {ev.split}"
    return line + "."


def front_matter(f: CardFacts) -> dict[str, Any]:
    kind = CARD_KINDS.get(f.kind)
    meta: dict[str, Any] = {"base_model": f.base_model_id or f.base_model, "library_name": "sentence-transformers"}
    lic = license_id(f.license)
    if lic:
        meta["license"] = lic
    if kind is not None:
        meta["pipeline_tag"] = kind.pipeline_tag
    tags = [*(kind.tags if kind else ()), "raytrieve", "generated_from_trainer"]
    tags += [f"loss:{n}" for n in sorted({loss_name(d.loss) for d in f.datasets})]
    tags.append(f"dataset_size:{sum(d.rows for d in f.datasets)}")
    meta["tags"] = tags
    if f.evaluation is not None and f.evaluation.metrics:
        meta["metrics"] = list(f.evaluation.metrics)
    return meta


def _usage(f: CardFacts) -> list[str]:
    kind = CARD_KINDS.get(f.kind)
    if kind is None:
        return []
    where = f.output_dir or "path/to/this/folder"
    # sentence-transformers reads a folder on disk: a model kept in an object store, a copy of it.
    local = "path/to/a/copy/of/this/folder" if "://" in where else where
    refs = [f"`{where}` (this folder)"]
    if f.run_id:
        refs.append(f"`runs:/{f.run_id}/model` (the MLflow run)")
    if f.register_as:
        refs.append(f"`models:/{f.register_as}/latest` (the registered model)")
    if f.kind == "cross":
        ours = [
            "from raytrieve import CrossEncoder",
            "",
            f'model = CrossEncoder("{where}")',
            'scores = model.predict([("how to sort a list", "sorted(xs) returns a new sorted list")])',
            'ranked = model.rank("how to sort a list", ["sorted(xs) ...", "len(xs) ..."])',
        ]
        theirs = [
            "from sentence_transformers import CrossEncoder",
            "",
            f'model = CrossEncoder("{local}")',
            'scores = model.predict([("how to sort a list", "sorted(xs) returns a new sorted list")])',
        ]
    else:
        ours = [
            f"from raytrieve import {kind.raytrieve_class}",
            "",
            f'model = {kind.raytrieve_class}("{where}")',
            'queries = model.encode_query(["how to sort a list"])',
            'documents = model.encode_document(["sorted(xs) returns a new sorted list"])',
            "scores = model.similarity(queries, documents)",
        ]
        theirs = [
            f"from sentence_transformers import {kind.st_class}",
            "",
            f'model = {kind.st_class}("{local}")',
            'queries = model.encode_query(["how to sort a list"])',
            'documents = model.encode_document(["sorted(xs) returns a new sorted list"])',
            "scores = model.similarity(queries, documents)",
        ]
    return [
        "## Usage",
        "",
        f"Any of {', '.join(refs)} loads the model; `raytrieve.encoders.load_encoder({f.kind!r}, ref)` does the "
        "same by kind, and Serve, `raytrieve encode` and `raytrieve mine` take the same references.",
        "",
        "With raytrieve:",
        "",
        "```python",
        *ours,
        "```",
        "",
        "With sentence-transformers (the folder is in its format):",
        "",
        "```python",
        *theirs,
        "```",
        "",
    ]


def _model_details(f: CardFacts) -> list[str]:
    kind = CARD_KINDS.get(f.kind)
    rows = [
        ["Model type", kind.what if kind else f.kind],
        ["Base model", f"`{f.base_model}`" + (f" ({f.base_model_id})" if f.base_model_id else "")],
        ["License", f.license or "unknown: the base model states none; check it before redistributing"],
    ]
    m = f.model
    if m is not None:
        if m.max_seq_length:
            rows.append(["Maximum sequence length", f"{number(m.max_seq_length)} tokens"])
        if m.dimension:
            label = {"dense": "Output dimensions", "sparse": "Output dimensions (vocabulary)"}.get(f.kind, "Labels")
            rows.append([label, number(m.dimension)])
        if m.similarity:
            rows.append(["Similarity function", m.similarity])
        if m.prompts:
            rows.append(["Prompts", ", ".join(f"{k}: `{v}`" for k, v in m.prompts.items())])
        rows.append(["Module stack", " → ".join(m.stack)])
    rows.append(["Training data", ", ".join(f"{d.name} ({number(d.rows)} rows)" for d in f.datasets)])
    return ["## Model details", "", *_table(["", ""], rows), ""]


def _training_data(f: CardFacts) -> list[str]:
    out = ["## Training data", ""]
    for d in f.datasets:
        out += [
            f"### {d.name}",
            "",
            f"- File: `{d.path}` ({d.format}), {number(d.rows)} rows"
            + (f", sampled with weight {number(d.weight)}" if len(f.datasets) > 1 else ""),
            f"- Columns: {', '.join(f'`{c}`' for c in d.columns)}"
            + (f"; label: `{d.label_column}`" if d.label_column else ""),
        ]
        if d.prompts:
            out.append(f"- Prompts: `{json.dumps(d.prompts, ensure_ascii=False)}`")
        out.append(f"- Loss: `{loss_name(d.loss)}`")
        if d.examples:
            types = [value_type([row.get(c) for row in d.examples]) for c in d.columns]
            out += ["", f"The first {len(d.examples)} rows (texts cut at {EXAMPLE_CHARS} characters):", ""]
            out += _table(
                [f"{c} ({t})" for c, t in zip(d.columns, types)],
                [[example_value(row.get(c)) for c in d.columns] for row in d.examples],
            )
        out += ["", "Loss and its arguments:", "", "```json", json.dumps(_loss_arguments(d.loss), indent=2), "```", ""]
    return out


def _hyperparameters(f: CardFacts) -> list[str]:
    cfg = f.config
    training, optimizer, schedule = cfg.get("training", {}), cfg.get("optimizer", {}), cfg.get("schedule", {})
    model = cfg.get("model", {})
    rows = [
        ["Batch size (per worker)", number(training.get("batch_size"))],
        ["Global batch (rows per optimizer step)", number(f.samples_per_step)],
        ["Gradient accumulation steps", number(training.get("gradient_accumulation_steps"))],
        ["Epochs", number(f.epochs)],
        ["Optimizer steps", number(f.steps)],
        ["Optimizer", f"{optimizer.get('name')}, learning rate {number(optimizer.get('learning_rate'))}, "
         f"weight decay {number(optimizer.get('weight_decay'))}"],
        ["Max gradient norm", number(optimizer.get("max_grad_norm"))],
        ["Schedule", f"{schedule.get('name')}, warmup ratio {number(schedule.get('warmup_ratio'))}"],
        ["Batch sampler", str(training.get("batch_sampler"))],
        ["Seed", number(training.get("seed"))],
        ["Max sequence length (config)", number(model.get("max_seq_length"))],
        ["bf16 autocast asked", str(training.get("bf16"))],
    ]  # fmt: skip
    if len(f.datasets) > 1:
        rows.append(["Multi-dataset sampler", str(training.get("multi_dataset_sampler"))])
    return [
        "## Training hyperparameters",
        "",
        *_table(["", ""], rows),
        "",
        f"Every setting of the run is in `{CONFIG_FILE}` next to this card (see Reproduce).",
        "",
    ]


def _hardware(f: CardFacts) -> list[str]:
    out = ["## Hardware and time", ""]
    h = f.hardware
    if h is not None:
        per = f", {h.threads_per_worker} torch thread(s) each" if h.threads_per_worker else ""
        unit = "GPU" if h.accelerator == "cuda" else "CPU worker"
        out += [
            f"- {h.workers} {unit}(s) ({h.strategy}){per}: {h.device_name}",
            f"- Precision: {h.precision}",
        ]
        if h.versions:
            out.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in h.versions.items()))
    if f.wall_time_s is not None:
        rate = f" ({f.steps / f.wall_time_s:.3g} steps/s)" if f.wall_time_s > 0 and f.steps else ""
        out.append(f"- Wall time: {duration(f.wall_time_s)} from the job's start to this model written{rate}")
    if len(out) == 2:
        out.append("Not recorded.")
    return [*out, ""]


def _evaluation(f: CardFacts) -> list[str]:
    ev = f.evaluation
    out = ["## Evaluation", ""]
    if ev is None:
        return [*out, "The run evaluated nothing (its config sets no `eval.path`).", ""]
    at = f" at step {number(ev.step)} (the last evaluation)" if ev.step is not None else ""
    out.append(f"Split **{ev.split}**: `{ev.path}`, {number(ev.rows)} rows, `{ev.evaluator}` evaluator{at}.")
    out.append("")
    if not ev.metrics:
        return [*out, "No metrics were recorded.", ""]
    rows = [
        [f"**{k}**" if k == ev.primary_metric else k, f"**{number(v)}**" if k == ev.primary_metric else number(v)]
        for k, v in ev.metrics.items()
    ]
    out += _table(["metric", ev.split], rows)
    if f.run_id:
        out += ["", f"Every evaluation and the training loss per step are metrics of MLflow run `{f.run_id}`."]
    return [*out, ""]


def _reproduce(f: CardFacts) -> list[str]:
    # `--config` reads a local file: a model in an object store is reproduced from a downloaded copy.
    config = f"{f.output_dir.rstrip('/')}/{CONFIG_FILE}" if f.output_dir and "://" not in f.output_dir else CONFIG_FILE
    return [
        "## Reproduce",
        "",
        f"`{CONFIG_FILE}` next to this card is the run's resolved config (paths absolute; its `output_dir` is "
        "this folder, so change it to keep this model). With the same data files, from a raytrieve checkout:",
        "",
        "```bash",
        f"raytrieve train --config {config}",
        "# on a Ray cluster:",
        'ray job submit --working-dir . --runtime-env-json \'{"py_modules": ["platform/raytrieve"]}\' \\',
        f"  -- python jobs/train.py --config {config}",
        "```",
        "",
        f"With the same seed ({number(f.config.get('training', {}).get('seed'))}) and worker count a run trains "
        "on the same batches in the same order.",
        "",
    ]


def _tracking(f: CardFacts) -> list[str]:
    if not f.run_id:
        return []
    lines = [f"- MLflow run `{f.run_id}`" + (f" in experiment `{f.experiment}`" if f.experiment else "")]
    if f.register_as:
        lines.append(f"- Registered as `{f.register_as}`")
    return ["## Tracking", "", *lines, ""]


def render(f: CardFacts) -> str:
    """The card as markdown with YAML front matter."""
    import yaml

    head = yaml.safe_dump(front_matter(f), sort_keys=False, allow_unicode=True)
    parts = [
        f"---\n{head}---",
        "",
        f"# {f.name}",
        "",
        summary(f),
        "",
        *_model_details(f),
        *_usage(f),
        *_training_data(f),
        *_hyperparameters(f),
        *_hardware(f),
        *_evaluation(f),
        *_reproduce(f),
        *_tracking(f),
        "## Framework",
        "",
        f"Trained and saved by raytrieve {f.raytrieve_version or ''}".rstrip()
        + " in the sentence-transformers folder format.",
        "",
    ]
    return "\n".join(parts)


def config_yaml(f: CardFacts) -> str:
    """``train_config.yaml``: the resolved config, loadable by ``raytrieve train --config``."""
    import yaml

    head = "# The resolved config of the run that trained this model; reproduce it with:\n"
    head += f"#   raytrieve train --config {CONFIG_FILE}\n"
    return head + yaml.safe_dump(f.config, sort_keys=False, allow_unicode=True)


def card_files(f: CardFacts) -> dict[str, str]:
    """The files a trained model's folder gets besides the model: name -> text."""
    return {CARD_FILE: render(f), CONFIG_FILE: config_yaml(f)}
