"""Each phase's config: the shipped YAML users run (``DemoConfig.configs``), read by the configs'
own loader with the demo's ``key=value`` overrides on top, so the demo cannot drift from what
``raytrieve train / encode / serve --config jobs/configs/...`` does.

The overrides are only what the demo must decide itself: paths into its out folder, its sizes
(max_seq_length, batch size, epochs, threads), one model per kind across every phase (the model
evaluated before fine-tuning is the one fine-tuned, encoded and served), its port and its MLflow
names; each other one says why next to it. A phase's config is saved with the overrides that made
it (``<out_dir>/configs/``), so it reruns outside the demo.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from raytrieve.config import ConfigModel, load_yaml
from raytrieve.demo.config import DemoConfig, FineTuneConfig
from raytrieve.errors import ConfigError

EXPERIMENT = "raytrieve-demo"

C = TypeVar("C", bound=ConfigModel)


@dataclass
class PhaseConfig(Generic[C]):
    config: C
    source: Path  # the shipped YAML
    overrides: list[str]  # key=value, as on the command line

    def save(self, path: Path, command: str) -> Path:
        """Write the resolved config, headed by how it was made, so ``command --config path`` reruns it."""
        import yaml

        from raytrieve._io import atomic_file

        lines = [f"# {self.source} with the demo's overrides:"]
        lines += [f"#   {shlex.quote(item)}" for item in self.overrides]
        lines.append(f"# Rerun with: {command} --config {path}")
        body = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
        return path


def _override(key: str, value: Any) -> str:
    """``key=value`` that parse_overrides reads back as exactly ``value``: YAML-dumped, so a path
    like ``out/a: b`` stays a string and a tag key with dots stays one key of a mapping."""
    import yaml

    dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={dumped.removesuffix('...').strip()}"


def load_phase(cls: type[C], cfg: DemoConfig, phase: str, overrides: dict[str, Any]) -> PhaseConfig[C]:
    """``cfg.configs.<phase>`` loaded as ``cls`` with ``overrides`` (dotted keys) on top."""
    source = cfg.configs.path(phase)
    items = [_override(k, v) for k, v in overrides.items()]
    if not source.exists():
        raise ConfigError(
            f"demo configs.{phase}: {source} not found; run from the raytrieve checkout, or set "
            f"configs.dir=<the folder with the shipped configs> (or configs.{phase}=<a path>)"
        )
    try:
        loaded = load_yaml(cls, source, items)
    except ConfigError as e:
        # The file is named once, up front; the keys then read as the overrides spell them, and
        # an override of the demo's that the shipped config refuses is named as the cause.
        text = str(e).replace(f"{source}.", "")
        culprits = [item for item in items if item.split("=", 1)[0] in text]
        cause = f"; the demo set {', '.join(culprits)} (from its own config)" if culprits else ""
        raise ConfigError(f"demo configs.{phase} ({source} with the demo's overrides): {text}{cause}") from None
    return PhaseConfig(loaded, source, items)


# A model kind's name in the demo config: models.<role>, <role>_training, configs.<role>_training.
ROLES = {"dense": "dense", "sparse": "sparse", "cross": "reranker"}


def train_config(cfg: DemoConfig, kind: str, ft: FineTuneConfig, train_path: Path) -> PhaseConfig[Any]:
    from raytrieve.train.config import TrainConfig

    role = ROLES[kind]
    phase = f"{role}_training"
    loaded = load_phase(
        TrainConfig,
        cfg,
        phase,
        {
            "model.name_or_path": getattr(cfg.models, role),
            "model.max_seq_length": cfg.models.max_seq_length,
            "datasets.0.path": str(train_path),
            "output_dir": str(cfg.out / "models" / kind),
            "training.batch_size": ft.batch_size,
            "training.epochs": ft.epochs,
            "training.max_steps": ft.max_steps,
            "training.bf16": ft.bf16,
            "optimizer.learning_rate": ft.learning_rate,
            # The demo scores the models itself before and after (dev in process, test over
            # HTTP); the shipped eval, over the whole pydocs test split, would only add minutes.
            "eval.path": None,
            "eval.evaluator": None,
            "eval.every_n_steps": None,
            "scaling.torch_threads": cfg.serving.torch_threads,
            "mlflow.tracking_uri": cfg.tracking_uri(),
            "mlflow.experiment": EXPERIMENT,
            "mlflow.run_name": f"demo-{kind}",
            "mlflow.register_model_as": ft.register_as,
            "mlflow.tags": {"raytrieve.demo": "true"},
        },
    )
    tc = loaded.config
    if tc.model.kind != kind:
        raise ConfigError(
            f"demo configs.{phase}: {loaded.source} trains a {tc.model.kind} model; name a {kind} training config"
        )
    if len(tc.datasets) != 1:
        raise ConfigError(
            f"demo configs.{phase}: {loaded.source} has {len(tc.datasets)} datasets; the demo fine-tunes on one "
            "(the train pairs, or for the reranker the mined rows): name a config with a single dataset"
        )
    return loaded


def mine_config(cfg: DemoConfig, train_path: Path, dense: str, output: Path) -> PhaseConfig[Any]:
    """Hard negatives for the train pairs, retrieved by ``dense`` (the fine-tuned model) from
    the train pairs' documents; n-tuples (query, positive, negative_1..) for the reranker."""
    from raytrieve.inference.config import MineConfig

    return load_phase(
        MineConfig,
        cfg,
        "mine",
        {
            "pairs.path": str(train_path),
            "pairs.query_column": "query",
            "pairs.positive_column": "document",
            "retriever.model": dense,
            "retriever.kind": "dense",
            "retriever.max_seq_length": cfg.models.max_seq_length,
            # The retriever's own scores pick the negatives: rescoring every candidate with the
            # cross-encoder about to be trained would cost more than the training.
            "reranker": None,
            "output_path": str(output),
            "output_format": "n-tuple",
            "compute.torch_threads": cfg.serving.torch_threads,
        },
    )


def encode_config(cfg: DemoConfig, corpus: Path, dense: str, sparse: str, folder: Path) -> PhaseConfig[Any]:
    from raytrieve.inference.config import EncodeConfig

    return load_phase(
        EncodeConfig,
        cfg,
        "encode",
        {
            "corpus.path": str(corpus),
            "output_dir": str(folder / "vectors"),
            "dense.model": dense,
            "dense.max_seq_length": cfg.models.max_seq_length,
            "sparse.model": sparse,
            "sparse.max_seq_length": cfg.models.max_seq_length,
            "compute.torch_threads": cfg.serving.torch_threads,
        },
    )


def serve_config(
    cfg: DemoConfig,
    dense: str,
    sparse: str,
    index: Path,
    search: dict[str, Any] | None = None,
    reranker: str | None = None,
) -> PhaseConfig[Any]:
    """``search``: /search's defaults fitted on the dev split (demo/fusion_fit.py), if any;
    ``reranker``: default models.reranker."""
    from raytrieve.serve.config import ServeConfig

    s, m = cfg.serving, cfg.models
    overrides: dict[str, Any] = {"index": str(index), "port": s.port, "mlflow_tracking_uri": cfg.tracking_uri()}
    if search is not None:
        overrides["search"] = search
    for role, model, length in (
        ("dense", dense, m.max_seq_length),
        ("sparse", sparse, m.max_seq_length),
        ("reranker", reranker or m.reranker, m.reranker_max_seq_length),
    ):
        overrides[f"{role}.model"] = model
        overrides[f"{role}.max_seq_length"] = length
        # Three 1-CPU replicas plus the ingress never schedule on a 2-core machine (Ray only
        # says "taken more than 30s to be scheduled"); half a CPU each fits the embedded Ray.
        overrides[f"{role}.num_cpus"] = 0.5
        overrides[f"{role}.torch_threads"] = s.torch_threads
    # Its own app name: on a cluster it joins (ray_address=None), the demo deploys and deletes its
    # app without touching one deployed under the shipped name.
    overrides["app_name"] = "raytrieve-demo"
    loaded = load_phase(ServeConfig, cfg, "serve", overrides)
    # The demo's queries ask for the whole ranking (top_k = recall), `recall` candidates per
    # retriever, from `clients` at once: widen only the shipped limits that would refuse them.
    needs = {
        "max_top_k": s.recall,
        # The fitted rerank's, and any depth the fit tried: the demo asks for its best one on test.
        "max_rerank_depth": max(s.rerank_depth, (search or {}).get("rerank_depth", 0), *cfg.fusion_fit.rerank_depths),
        "max_recall": s.recall,
        "max_queued_requests": s.clients,
    }
    wider = {f"limits.{k}": v for k, v in needs.items() if getattr(loaded.config.limits, k) < v}
    return load_phase(ServeConfig, cfg, "serve", {**overrides, **wider}) if wider else loaded


def served_reranker(cfg: DemoConfig, dense: str, sparse: str, index: Path, reranker: str) -> Any:
    """The reranker deployment (serve/config.py ``DeploymentConfig``) of the app ``serve_config``
    builds for these models, which /search's fitted defaults leave as it is: the dev fit
    (demo/fusion_fit.py) scores pairs with the model and settings the served app will use."""
    served = serve_config(cfg, dense, sparse, index, None, reranker)
    if served.config.reranker is None:  # serve_config sets reranker.model: never, short of a bug there
        raise ConfigError(f"demo configs.serve ({served.source}): no reranker deployment after the demo's overrides")
    return served.config.reranker


def check_all(cfg: DemoConfig) -> None:
    """Load every phase's config once before any work starts: a broken shipped YAML or override
    then fails in seconds instead of after the data build and the pretrained evaluation. The
    paths are the pretrained phase's; only whether the configs load is checked. The models'
    lengths are checked against their positions here too: the first model to load would refuse
    them, but without naming the demo's key."""
    from raytrieve.errors import ModelLoadError
    from raytrieve.model_ref import check_max_seq_length, is_model_uri, resolve_model

    m = cfg.models
    lengths = [
        (m.dense, m.max_seq_length, "models.max_seq_length"),
        (m.sparse, m.max_seq_length, "models.max_seq_length"),
        (m.reranker, m.reranker_max_seq_length, "models.reranker_max_seq_length"),
    ]
    if cfg.reranker_training.enabled:  # it trains at the retrievers' length
        lengths.append((m.reranker, m.max_seq_length, "models.max_seq_length"))
    for model, length, field in lengths:
        if is_model_uri(model):  # a registered model: its store is not set up yet
            continue
        try:
            folder = resolve_model(model)
        except ModelLoadError:
            continue  # said with the model's key where the phase that loads it starts
        check_max_seq_length(folder, length, f"demo {field} (for {model})")
    for kind, ft in (("dense", cfg.dense_training), ("sparse", cfg.sparse_training)):
        if ft.enabled:
            train_config(cfg, kind, ft, cfg.out / "data" / "train.parquet")
    if cfg.reranker_training.enabled:
        mined = cfg.out / "mined" / "train_hard_negatives.parquet"
        mine_config(cfg, cfg.out / "data" / "train.parquet", m.dense, mined)
        train_config(cfg, "cross", cfg.reranker_training, mined)
    encode_config(cfg, cfg.out / "data" / "test_corpus.parquet", m.dense, m.sparse, cfg.out / "pretrained")
    serve_config(cfg, m.dense, m.sparse, cfg.out / "pretrained" / "index")
