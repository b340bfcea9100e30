"""The facts of a model card, gathered where they are known: ``driver_facts`` on the driver
before training (the base model and its license, the data, the config, the plan), ``finish``
on rank 0 once the model is trained (hardware, precision, time, the last evaluation, the
model). ``raytrieve.train.model_card`` turns them into the card.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytrieve._io import redact, redact_values
from raytrieve.data.files import is_uri
from raytrieve.train.model_card import (
    EXAMPLE_ROWS,
    CardFacts,
    DatasetFacts,
    EvalFacts,
    HardwareFacts,
    ModelFacts,
)

if TYPE_CHECKING:
    from raytrieve.train.config import TrainConfig
    from raytrieve.train.run import Prepared

# A shipped variant's description starts with the model's Hub id (models/*/model.yaml).
_HUB_ID = re.compile(r"^([\w.-]+/[\w.-]+)[,\s]")


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model folder's README.md ({} when there is none or it is not YAML)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_model_facts(reference: str, folder: Path) -> tuple[str | None, str | None]:
    """(the upstream Hub id, the license) of the model a run starts from: a shipped variant's
    catalogue entry, else what the folder's own card states (a model raytrieve trained carries
    both on; a sentence-transformers folder from the Hub states them too)."""
    from raytrieve import assets

    if reference in assets.variant_names():
        variant = assets.get_variant(reference)
        match = _HUB_ID.match(variant.description)
        return (match.group(1) if match else None), (variant.license or None)
    meta = _front_matter(folder / "README.md")
    base = meta.get("base_model")
    lic = meta.get("license")
    return (str(base) if isinstance(base, str) else None), (str(lic) if lic else None)


def _examples(pieces: list, columns: list[str]) -> list[dict[str, Any]]:
    """The dataset's first rows, only ``columns`` (one record batch of the first piece is read)."""
    from raytrieve.data.train_source import iter_piece

    for piece in pieces:
        batch = next(iter(iter_piece(piece, columns)), None)
        if batch is not None and batch.num_rows:
            return batch.slice(0, EXAMPLE_ROWS).to_pylist()
    return []


def driver_facts(cfg: TrainConfig, p: Prepared, started: float) -> CardFacts:
    """What the driver knows before training; rank 0 completes it (``finish``)."""
    from raytrieve import __version__
    from raytrieve.model_ref import resolve_model

    reference = cfg.model.name_or_path
    base_id, lic = base_model_facts(reference, resolve_model(reference))
    datasets = []
    for i, d in enumerate(cfg.datasets):
        label = p.label_columns[i]
        columns = [*p.text_columns[i], *([label] if label else [])]
        datasets.append(
            DatasetFacts(
                name=d.name,
                path=redact(d.path),
                format=d.format or (p.pieces[i][0].fmt if p.pieces[i] else "unknown"),  # as the checks read it
                rows=p.rows[i],
                columns=columns,
                label_column=label,
                loss=d.loss.model_dump(mode="json"),
                examples=_examples(p.pieces[i], columns),
                prompts=d.prompts,
                weight=d.weight,
            )
        )
    evaluation = None
    if cfg.eval.path and cfg.eval.evaluator and p.spec.eval_columns:
        first = next(iter(p.spec.eval_columns.values()), [])
        evaluation = EvalFacts(
            split=cfg.eval.path.rstrip("/").rsplit("/", 1)[-1].split(".")[0],
            path=redact(cfg.eval.path) if is_uri(cfg.eval.path) else str(Path(cfg.eval.path).resolve()),
            evaluator=cfg.eval.evaluator,
            rows=len(first),
        )
    output = Path(cfg.output_dir.partition("?")[0] if is_uri(cfg.output_dir) else cfg.output_dir)  # not a URI's query
    name = cfg.mlflow.register_model_as or cfg.mlflow.run_name
    if not name:  # a folder called model names nothing: the one above it does (out/dense-mnrl/model)
        name = output.parent.name if output.name == "model" and output.parent.name else output.name
    return CardFacts(
        kind=cfg.model.kind,
        name=name,
        base_model=redact(reference),
        base_model_id=base_id,
        license=lic,
        datasets=datasets,
        config=redact_values(cfg.model_dump(mode="json")),  # the card and its config are shared: no URI keys
        steps=p.plan.optimizer_steps,
        epochs=len(p.plan.steps_per_epoch),
        samples_per_step=p.spec.samples_per_step,
        evaluation=evaluation,
        started=started,
        output_dir=redact(cfg.output_dir),
        experiment=cfg.mlflow.experiment,
        register_as=cfg.mlflow.register_model_as,
        raytrieve_version=__version__,
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def hardware_facts(device: Any, workers: int, threads: int | None, strategy: str, bf16: bool) -> HardwareFacts:
    """What rank 0 ran on (every worker of a run has the same kind of device)."""
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    ray = sys.modules.get("ray")
    if ray is not None:
        versions["ray"] = str(getattr(ray, "__version__", ""))
    versions["python"] = platform.python_version()
    cuda = getattr(device, "type", str(device)) == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    precision = "bfloat16 autocast (weights and optimizer float32)" if bf16 else "float32"
    return HardwareFacts(
        accelerator="cuda" if cuda else "cpu",
        device_name=name,
        workers=workers,
        threads_per_worker=None if cuda else threads,
        strategy=strategy,
        precision=precision,
        versions=versions,
    )


def model_facts(encoder: Any) -> ModelFacts:
    dimension = encoder.get_embedding_dimension()
    return ModelFacts(
        stack=[type(m).__name__ for m in encoder.modules_list],
        max_seq_length=getattr(encoder, "max_seq_length", None),
        dimension=int(dimension) if dimension else None,
        similarity=getattr(encoder, "similarity_fn_name", None),
        # The prompts it puts before texts (sentence-transformers' empty defaults put none).
        prompts={k: v for k, v in (getattr(encoder, "prompts", None) or {}).items() if v},
    )


def finish(
    facts: CardFacts,
    *,
    hardware: HardwareFacts,
    model: ModelFacts,
    steps: int,
    evaluation: dict[str, Any] | None,
    run_id: str | None,
) -> CardFacts:
    """The driver's facts completed on rank 0 as the final model is written. ``evaluation``:
    the last evaluation, ``{"step", "metrics", "primary_metric"}``, or None."""
    ev = facts.evaluation
    if ev is not None and evaluation is not None:
        ev = dataclasses.replace(
            ev,
            step=evaluation["step"],
            metrics={k: float(v) for k, v in evaluation["metrics"].items() if isinstance(v, (int, float))},
            primary_metric=evaluation.get("primary_metric"),
        )
    wall = time.time() - facts.started if facts.started is not None else None
    return dataclasses.replace(
        facts, hardware=hardware, model=model, steps=steps, evaluation=ev, wall_time_s=wall, run_id=run_id
    )
