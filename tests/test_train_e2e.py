"""Training end to end on a real local Ray: each shipped config (tiny model, tiny data) trains,
checkpoints, logs to a real MLflow file store, and saves a model sentence-transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raytrieve.data.files import OutputStore
from raytrieve.ray_cluster import connect, own_placement_groups
from raytrieve.train.checkpoint import RUN_STAMP, checkpoint_dir
from raytrieve.train.run import prepare, run_training
from tests.conftest import SENTENCES, state_address
from tests.object_store import BUCKET
from tests.train_helpers import check_shipped_run, shipped_config, write_data

CONFIGS = ["dense_cached_mnrl_matryoshka", "splade", "router_inference_free_splade", "cross_bce",
           "cross_lambda"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def more_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("more_data"), n=96)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains(name, ray_cluster, tiny_models, more_data, tmp_path):
    """dense_mnrl is proven the same way through `ray job submit` (tests/test_job_submit.py).
    The cached-MNRL Matryoshka run trains with training.bf16 (autocast on this CPU when it has
    bf16: GradCache's replayed passes included); it must still lower its loss, measured in
    float32, and save float32 weights. Each run registers its model (the version is described by
    the model card's summary: check_shipped_run)."""
    bf16 = name == "dense_cached_mnrl_matryoshka"
    # cross_bce trains with a prompt before each pair's query, as sentence-transformers' CrossEncoder can
    extra = {"training__bf16": True} if bf16 else {"prompts": "question: "} if name == "cross_bce" else {}
    cfg = shipped_config(name, tmp_path, tiny_models, more_data, mlflow__register_model_as=f"t-{name}", **extra)
    prepared = prepare(cfg).spec  # the config as the run fills it in (here cross_bce's prompts per dataset)
    initial = prepared.model_path  # the model training starts from (inference-free: the built router)
    result = run_training(cfg)
    check_shipped_run(prepared.config, initial, result.steps, result.run_id, result.model_version)
    assert result.dropped == []
    # The summary shows the evaluator's last figures, as the MLflow run holds them.
    logged = MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id).data.metrics
    # The summary shows them under the evaluator's own names (ndcg@10: MLflow's metrics cannot hold "@").
    from raytrieve.tracking.mlflow_run import metric_name

    assert {metric_name(k): v for k, v in result.eval_metrics.items()} == {
        k: v for k, v in logged.items() if k.startswith("eval_")}
    assert bool(result.eval_metrics) == bool(cfg.eval.path)
    assert not result.eval_metrics or any("@10" in k for k in result.eval_metrics), result.eval_metrics
    if name == "cross_bce":  # the model scores as it trained, by default: check_shipped_run compared predict
        from sentence_transformers import CrossEncoder

        saved = CrossEncoder(cfg.output_dir, device="cpu")
        assert (saved.prompts, saved.default_prompt_name) == ({"query": "question: "}, "query")
    if bf16:  # trained on "query: ..." and "document: ...": the model encodes so (sentence-transformers reads it)
        from sentence_transformers import SentenceTransformer

        saved = SentenceTransformer(cfg.output_dir, device="cpu").prompts
        assert cfg.datasets[0].prompts == {"query": "query: ", "document": "document: "}  # columns = roles here
        assert (saved.get("query"), saved.get("document")) == ("query: ", "document: ")
    if bf16:
        from safetensors import safe_open

        from raytrieve.encoders.precision import cpu_has_fast_bf16

        history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(result.run_id, "bf16_autocast")
        assert [m.value for m in history] == [float(cpu_has_fast_bf16())]

        files = list(Path(cfg.output_dir).rglob("*.safetensors"))
        assert files
        for f in files:
            with safe_open(str(f), "pt") as st:
                assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}, f


def _kill_a_worker_after_a_checkpoint(run: OutputStore) -> None:
    """SIGKILL one Ray Train worker once the controller has registered a checkpoint (its snapshot
    names one). ``run``: the run's folder of Ray Train's storage, on disk or in an object store."""
    import os
    import signal
    import time

    def registered() -> bool:
        try:
            text = run.read_bytes("checkpoint_manager_snapshot.json").decode()
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
    """PIDs of the live Ray Train worker actors, as Ray's state API knows them. Not by process
    title: a worker's title names the call it runs, and some (``ray::execute._propagate_data_context``)
    do not name its class, so a scan of titles missed a running worker now and then."""
    from ray.util.state import list_actors

    actors = list_actors(state_address(), filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         limit=10_000, raise_on_missing_output=False)
    return sorted(a.pid for a in actors if a.pid)


def _weights(path: str, kind: str = "dense"):
    import torch

    from raytrieve.encoders import load_encoder

    return load_encoder(kind, path).state_dict()


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_models, data, tmp_path_factory):
    """The resume tests' reference: the same config and seed on 2 DDP workers, never interrupted,
    with no intermediate checkpoints. FSDP computes the same mean gradients, so its resumed run
    must end here too (within float tolerance), which also proves FSDP and DDP train alike."""
    reference = shipped_config("dense_mnrl", tmp_path_factory.mktemp("uninterrupted"), tiny_models, data,
                               scaling__num_workers=2, scaling__strategy="ddp", training__epochs=3, eval={},
                               checkpoint__every_n_steps=None)
    return run_training(reference), _weights(reference.output_dir)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_resume_after_a_worker_is_killed(strategy, ray_cluster, tiny_models, data, uninterrupted,
                                                     s3_store, tmp_path):
    """2 workers (DDP, or FSDP with sharded weights and optimizer state); once a checkpoint exists
    a worker process is SIGKILLed; Ray Train restarts the group from the last checkpoint
    (FailureConfig). The resumed run ends with the weights of an uninterrupted run of the same
    config and seed: weights, optimizer, schedule, RNG (dropout is on) and data order were all
    restored, not only the step count. The final model is the gathered full model, which
    sentence-transformers loads with raytrieve's outputs. The DDP run keeps its checkpoints in an
    object store (tests/object_store.py's S3 server, named by checkpoint.dir's URI), the FSDP run
    on disk."""
    import threading

    import torch
    from sentence_transformers import SentenceTransformer

    from raytrieve.encoders import load_encoder

    # max_failures 2, not the default 1: once (stop 25, FSDP) the restarted group's rank 1 aborted
    # in the final save with glibc's "malloc(): unaligned tcache chunk detected" (heap corruption,
    # not reproduced since; kept open in the issue notes). A second restart then still has to end
    # at the uninterrupted weights, which is what this test proves.
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, scaling__num_workers=2,
                         scaling__strategy=strategy, checkpoint__every_n_steps=3, training__epochs=3, eval={},
                         checkpoint__max_failures=2)
    if strategy == "ddp":
        cfg.checkpoint.dir = s3_store.uri(f"checkpoints/{tmp_path.name}")
    ckpts = OutputStore(f"{checkpoint_dir(cfg)}/run" if strategy == "fsdp" else s3_store.uri(
        f"checkpoints/{tmp_path.name}/run"))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_training(cfg)), daemon=True)
    runner.start()
    _kill_a_worker_after_a_checkpoint(ckpts)
    runner.join(timeout=600)
    result = outcome["result"]
    assert result.steps == 3 * 24 // 8  # 3 epochs of 24 rows, global batch 2 x 4
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert resumed and 1 <= resumed[0].value < result.steps, (steps, ckpts.names())
    if strategy == "ddp":  # the stamp and Ray Train's checkpoints went to the bucket, the result names one there
        assert RUN_STAMP in OutputStore(cfg.checkpoint.dir).names() and any(n.startswith("step-") for n in ckpts.names())
        # The result (kept in the run's stamp) names the checkpoint without the URI's keys.
        assert result.checkpoint.startswith(f"s3://{BUCKET}/checkpoints/{tmp_path.name}/run/step-")
        step = result.checkpoint.split("?")[0].rsplit("/", 1)[1]
        assert OutputStore(s3_store.uri(f"checkpoints/{tmp_path.name}/run/{step}")).exists("state.pt")
    # Steps up to the checkpoint are not redone: only those after it can appear twice.
    start = int(resumed[0].value)
    assert sorted(set(steps)) == list(range(1, result.steps + 1))
    assert all(steps.count(s) == 1 for s in range(1, start + 1))
    assert client.get_run(result.run_id).info.status == "FINISHED"

    # The same config and seed, never interrupted and with no intermediate checkpoints (DDP).
    reference, want = uninterrupted
    assert reference.steps == result.steps
    got = _weights(cfg.output_dir)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(want[k], v) for k, v in _weights(str(tiny_models["dense"])).items())

    ours = load_encoder("dense", cfg.output_dir).encode(SENTENCES[:4], convert_to_tensor=True)
    theirs = SentenceTransformer(cfg.output_dir, device="cpu").encode(SENTENCES[:4], convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


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

    # The embedded Ray (the session's, started by raytrieve.ray_cluster.connect) runs Ray Train
    # without its preemption watcher: a controller ran, and no watcher actor was ever created.
    from ray.util.state import list_actors

    def created(cls: str) -> int:
        return len(list_actors(state_address(), filters=[("class_name", "=", cls)], limit=10_000,
                               raise_on_missing_output=False))

    assert created("TrainController") >= 1 and created("PreemptionWatcher") == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("when", ["workers", "placement group"])
def test_ctrl_c_stops_the_run_and_ends_it_killed_in_mlflow(ray_cluster, tiny_models, data, tmp_path, when):
    """Ctrl-C (a real SIGINT to this process, the run's driver) while the run trains: a
    KeyboardInterrupt out of run_training, its MLflow run KILLED, and the run stopped, workers
    included, though this process lives on (a notebook's). Ray Train's own SIGINT handler
    aborted the run and then called sys.exit(0): a SystemExit, no line, and the run ended FAILED.
    ``when``: the interrupt comes once the workers run, or as soon as the run has reserved their
    placement group (before Ray Train's cleaner knows of it: that run kept the CPUs reserved)."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    def alive(cls: str) -> list:
        return list_actors(state_address(), filters=[("class_name", "=", cls), ("state", "=", "ALIVE")],
                           raise_on_missing_output=False)

    # Many epochs: the run is still training whenever the interrupt comes.
    cfg = shipped_config("dense_mnrl", tmp_path, tiny_models, data, training__epochs=200, eval={})
    others = set(_train_worker_pids())  # none of this session's: its earlier runs have ended
    groups = own_placement_groups()  # the CPUs this session's driver holds reserved
    signalled, done = threading.Event(), threading.Event()
    running: set[int] = set()  # the run's workers when the signal went

    def workers() -> set[int]:
        return set(_train_worker_pids()) - others

    def started() -> bool:
        return bool(workers()) if when == "workers" else bool(own_placement_groups() - groups)

    def interrupt() -> None:
        deadline = time.time() + 300
        while not started() and time.time() < deadline and not done.is_set():
            time.sleep(0.5 if when == "workers" else 0.05)
        # Else no signal: the test fails on the run not being interrupted.
        if started() and not done.wait(2 if when == "workers" else 0):
            running.update(workers())
            signalled.set()
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    finally:
        done.set()  # a run that ended otherwise gets no signal later, in another test
        thread.join()
    assert signalled.is_set()
    # The window each case is about: while the workers train, or before any worker process ran
    # (Ray Train's cleaner learns of their group only once they have started).
    assert bool(running) == (when == "workers"), running
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not Path(cfg.output_dir).exists()  # no half-written final model
    deadline = time.time() + 60
    def exists(pid: int) -> bool:  # a process, not a zombie (whose cmdline reads empty)
        try:
            return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            return False

    def stopped() -> bool:  # the controller, the workers Ray knows, and the workers' processes
        return not alive("TrainController") and not workers() and not any(exists(p) for p in running)

    while not stopped() and time.time() < deadline:
        time.sleep(0.5)
    assert stopped(), "the interrupted run kept running"
    # The next job in this process has its workers' CPUs: a run stopped while its workers started
    # kept their placement group, and the next run here waited forever for its data stage.
    connect(None)  # as every job here begins
    deadline = time.time() + 30
    while own_placement_groups() - groups and time.time() < deadline:
        time.sleep(0.5)
    assert not own_placement_groups() - groups, "the interrupted run kept its workers' CPUs reserved"
    # Ray Train's handler is not left behind: a later Ctrl-C is Python's KeyboardInterrupt again.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
    _kill_a_worker_after_a_checkpoint(OutputStore(f"{checkpoint_dir(cfg)}/run"))
    runner.join(timeout=300)
    assert isinstance(outcome.get("error"), TrainingError)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "out" / "dense_mnrl").exists()  # no half-written final model
