"""Training end to end on a real local Ray: each shipped config (tiny model, tiny data) trains,
checkpoints, logs to a real MLflow file store, and saves a model sentence-transformers loads."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raytrieve.train.run import prepare, run_training
from tests.conftest import SENTENCES
from tests.train_helpers import loss_on_data, shipped_config, write_data

CONFIGS = ["dense_mnrl", "dense_cached_mnrl_matryoshka", "splade", "router_inference_free_splade", "cross_bce",
           "cross_lambda"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def more_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("more_data"), n=96)


def _st_load(kind: str, path: str):
    import sentence_transformers as st

    cls = {"dense": st.SentenceTransformer, "sparse": st.SparseEncoder, "cross": st.CrossEncoder}[kind]
    return cls(path, device="cpu")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains(name, ray_cluster, tiny_models, more_data, tmp_path):
    # 96 rows (24 steps): 6 tiny steps move a random tiny SPLADE less than dropout noise does.
    cfg = shipped_config(name, tmp_path, tiny_models, more_data)
    initial = prepare(cfg).spec.model_path  # the model training starts from (inference-free: the built router)
    result = run_training(cfg)
    rows = 96 * (2 if name == "cross_bce" else 1)
    assert result.steps == -(-rows // 4)  # every row trained on, the last batch smaller
    assert result.dropped == []

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.batch_size"] == "4"
    assert run.data.params["datasets.0.loss.name"] == cfg.datasets[0].loss.name
    history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == list(range(1, result.steps + 1))
    assert all(m.value == m.value for m in history)  # no NaN
    assert {"learning_rate", "samples_per_s"} <= set(run.data.metrics)
    if cfg.datasets[0].loss.name == "SpladeLoss":  # dict loss: each component logged too
        assert {"loss_base_loss", "loss_document_regularizer_loss", "splade_document_regularizer_weight"} <= set(
            run.data.metrics), sorted(run.data.metrics)
    if cfg.eval.path:
        assert any(k.startswith("eval_") and "_at_" in k for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/modules.json" in artifacts
    if cfg.mlflow.register_model_as:
        assert result.model_version == "1"
        assert client.get_model_version(cfg.mlflow.register_model_as, "1").run_id == result.run_id

    # Training did something, measured outside the trainer: every weight tensor the run was
    # meant to train moved, and the config's own loss over its data went down.
    import torch

    from raytrieve.train.loop import load_encoder

    ours = load_encoder(cfg.model.kind, cfg.output_dir, torch.device("cpu"))
    before = load_encoder(cfg.model.kind, initial, torch.device("cpu")).state_dict()
    moved = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2, sorted(set(before) - set(moved))
    start, end = loss_on_data(cfg, initial), loss_on_data(cfg, cfg.output_dir)
    assert end < start, (start, end)

    # The final model: sentence-transformers loads it and gives the same outputs as raytrieve.
    theirs = _st_load(cfg.model.kind, cfg.output_dir)
    if cfg.model.kind == "cross":
        pairs = list(zip(SENTENCES[:4], SENTENCES[4:8]))
        torch.testing.assert_close(torch.as_tensor(ours.predict(pairs)), torch.as_tensor(theirs.predict(pairs)),
                                   atol=1e-5, rtol=1e-4)
    else:
        a = ours.encode_document(SENTENCES[:4], convert_to_tensor=True)
        b = theirs.encode_document(SENTENCES[:4], convert_to_tensor=True)
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b,
                                   atol=1e-5, rtol=1e-4)


def _kill_a_worker_after_a_checkpoint(ckpts) -> None:
    """SIGKILL one Ray Train worker once the controller has registered a checkpoint (its snapshot names one)."""
    import os
    import signal
    import time

    snapshot = ckpts / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        try:
            text = snapshot.read_text()
        except OSError:
            return False
        return '"latest_checkpoint_result": null' not in text and "step-" in text

    deadline = time.time() + 400
    while not registered() and time.time() < deadline:
        time.sleep(0.2)
    assert registered(), "no checkpoint was registered"
    workers = _train_worker_pids()
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1], signal.SIGKILL)


def _train_worker_pids() -> list[int]:
    """PIDs of Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _weights(path: str, kind: str = "dense"):
    import torch

    from raytrieve.train.loop import load_encoder

    return load_encoder(kind, path, torch.device("cpu")).state_dict()


@pytest.mark.timeout(900)
def test_two_workers_resume_after_a_worker_is_killed(ray_cluster, tiny_models, data, tmp_path):
    """2 DDP workers; once a checkpoint exists a worker process is SIGKILLed; Ray Train restarts
    the group from the last checkpoint (FailureConfig). The resumed run ends with the weights of
    an uninterrupted run of the same config and seed: weights, optimizer, schedule, RNG (dropout
    is on) and data order were all restored, not only the step count."""
    import threading

    import torch

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=2,
                         checkpoint__every_n_steps=1, training__epochs=3, eval={})
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_training(cfg)), daemon=True)
    runner.start()
    ckpts = tmp_path / "out" / "dense_mnrl.checkpoints" / "run"
    _kill_a_worker_after_a_checkpoint(ckpts)
    runner.join(timeout=600)
    result = outcome["result"]
    assert result.steps == 3 * 24 // 8  # 3 epochs of 24 rows, global batch 2 x 4
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert resumed and 1 <= resumed[0].value < result.steps, (steps, sorted(p.name for p in ckpts.iterdir()))
    # Steps up to the checkpoint are not redone: only those after it can appear twice.
    start = int(resumed[0].value)
    assert sorted(set(steps)) == list(range(1, result.steps + 1))
    assert all(steps.count(s) == 1 for s in range(1, start + 1))
    assert client.get_run(result.run_id).info.status == "FINISHED"

    # The same config and seed, never interrupted and with no intermediate checkpoints.
    reference = shipped_config("dense_mnrl", tmp_path / "ref", tiny_models, data, scaling__num_workers=2,
                               training__epochs=3, eval={}, checkpoint__every_n_steps=None)
    assert run_training(reference).steps == result.steps
    got, want = _weights(cfg.output_dir), _weights(reference.output_dir)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(want[k], v) for k, v in _weights(str(tiny_models["dense"])).items())


@pytest.mark.timeout(600)
def test_fsdp_two_workers_train_and_save_a_loadable_model(ray_cluster, tiny_models, data, tmp_path):
    import torch

    from raytrieve.train.loop import load_encoder

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=2, scaling__strategy="fsdp")
    result = run_training(cfg)
    assert result.steps == 24 // 8
    assert MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.run_id).info.status == "FINISHED"
    trained = load_encoder("dense", cfg.output_dir, torch.device("cpu"))
    start = load_encoder("dense", str(tiny_models["dense"]), torch.device("cpu"))
    a, b = trained.encode(SENTENCES[:4], convert_to_tensor=True), start.encode(SENTENCES[:4], convert_to_tensor=True)
    assert not torch.allclose(a, b)  # the gathered full weights were saved, not the initial ones
    torch.testing.assert_close(a, _st_load("dense", cfg.output_dir).encode(SENTENCES[:4], convert_to_tensor=True),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.timeout(600)
def test_two_datasets_each_batch_from_one_dataset_with_its_loss(ray_cluster, tiny_models, data, tmp_path):
    datasets = [
        {"name": "pairs", "path": str(data["train"]), "columns": ["query", "document"],
         "loss": {"name": "MultipleNegativesRankingLoss"}},
        {"name": "scored", "path": str(data["labeled"]), "columns": ["query", "document"], "label_column": "label",
         "loss": {"name": "CoSENTLoss"}, "weight": 2.0},
    ]
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, datasets=datasets, eval={})
    result = run_training(cfg)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    per_dataset = {name: [m.step for m in client.get_metric_history(result.run_id, f"{name}_loss")]
                   for name in ("pairs", "scored")}
    assert len(per_dataset["pairs"]) == 24 // 4
    assert len(per_dataset["pairs"]) + len(per_dataset["scored"]) == result.steps
    assert sorted(per_dataset["pairs"] + per_dataset["scored"]) == list(range(1, result.steps + 1))


@pytest.mark.timeout(600)
def test_a_failed_run_ends_failed_in_mlflow(ray_cluster, tiny_models, data, tmp_path):
    import threading

    from raytrieve.train.run import TrainingError

    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, checkpoint__every_n_steps=1,
                         checkpoint__max_failures=0, training__epochs=3, eval={})
    outcome = {}

    def run() -> None:
        try:
            run_training(cfg)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    _kill_a_worker_after_a_checkpoint(tmp_path / "out" / "dense_mnrl.checkpoints" / "run")
    runner.join(timeout=300)
    assert isinstance(outcome.get("error"), TrainingError)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "out" / "dense_mnrl").exists()  # no half-written final model
