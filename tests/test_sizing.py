"""Defaults sized from the cluster (raytrieve.sizing, serve/config.py's sized and check_fits):
plain arithmetic over a cluster shape, checked here without Ray; the jobs that use them run in
test_train_e2e.py, test_encode_job.py and test_serve.py."""

from __future__ import annotations

import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.inference.config import EncodeComputeConfig
from raytrieve.serve.config import ServeConfig, check_fits, sized
from raytrieve.sizing import ClusterShape, default_encode_actors, replica_threads, train_threads

LAPTOP = ClusterShape(cpus=2, largest_node_cpus=2)
TWO_BIG_NODES = ClusterShape(cpus=32, largest_node_cpus=16, gpus=2, largest_node_gpus=1)


def test_one_training_worker_on_the_embedded_ray_gets_the_machine():
    assert train_threads(LAPTOP, 1) == 2
    assert train_threads(LAPTOP, 2) == 1
    assert train_threads(LAPTOP, 3) == 1  # never 0
    # one worker never gets more threads than its node has
    assert train_threads(TWO_BIG_NODES, 1) == 16
    assert train_threads(TWO_BIG_NODES, 4) == 8


def test_encode_actors_fill_the_cpus_beside_the_tokenizers_and_never_outnumber_shards():
    compute = EncodeComputeConfig()
    assert default_encode_actors(LAPTOP, compute, use_gpu=False, shards=100) == 1  # 2 - 0.5 -> 1
    assert default_encode_actors(TWO_BIG_NODES, compute, use_gpu=False, shards=100) == 31
    assert default_encode_actors(TWO_BIG_NODES, compute, use_gpu=False, shards=3) == 3
    wide = EncodeComputeConfig(cpus_per_encode_actor=4, tokenize_actors=2)
    assert default_encode_actors(TWO_BIG_NODES, wide, use_gpu=False, shards=100) == 7  # (32 - 1) / 4
    assert default_encode_actors(TWO_BIG_NODES, compute, use_gpu=True, shards=100) == 2  # one per GPU


def _serve(**models) -> ServeConfig:
    return from_dict(ServeConfig, {**models, "index": "somewhere"}, where="test")


def test_the_shipped_three_models_fit_two_cpus_when_unset():
    cfg = sized(_serve(dense={"model": "a"}, sparse={"model": "b"}, reranker={"model": "c"}), LAPTOP)
    cpus = [cfg.dense.num_cpus, cfg.sparse.num_cpus, cfg.reranker.num_cpus]  # type: ignore[union-attr]
    # 2 CPUs less the ingress (0.1; the query encoders hold the index), split three ways in steps of 0.05
    assert cpus == [0.6, 0.6, 0.6]
    # The query encoders run side by side: 1 thread each (their share). The reranker runs after
    # them, so it gets the node's 2 CPUs (its one replica alone among rerankers).
    assert [cfg.dense.torch_threads, cfg.sparse.torch_threads, cfg.reranker.torch_threads] == [1, 1, 2]  # type: ignore[union-attr]
    check_fits(cfg, LAPTOP)  # does not raise


def test_set_cpus_are_kept_and_the_rest_share_what_is_left():
    cfg = sized(_serve(dense={"model": "a", "num_cpus": 1.0, "torch_threads": 2},
                       reranker={"model": "c", "num_replicas": 2}), ClusterShape(cpus=8, largest_node_cpus=8))
    assert (cfg.dense.num_cpus, cfg.dense.torch_threads) == (1.0, 2)  # type: ignore[union-attr]
    # (8 - 1 - 0.1 ingress) / 2 replicas = 3.45 each
    assert cfg.reranker.num_cpus == pytest.approx(3.45)  # type: ignore[union-attr]
    # Its CPU share alone would give 3 threads; a reranker gets the node's 8 CPUs shared by its
    # 2 replicas, capped at 4: 4.
    assert replica_threads(3.45) == 3
    assert cfg.reranker.torch_threads == 4  # type: ignore[union-attr]
    check_fits(cfg, ClusterShape(cpus=8, largest_node_cpus=8))


@pytest.mark.parametrize("colocate", [True, False])
def test_a_config_the_cluster_cannot_hold_is_refused_naming_each_ask(colocate):
    cfg = _serve(dense={"model": "a", "num_cpus": 1}, sparse={"model": "b", "num_cpus": 1},
                 reranker={"model": "c", "num_cpus": 1}, colocate_index=colocate)
    with pytest.raises(ConfigError) as e:
        check_fits(sized(cfg, LAPTOP), LAPTOP, "serve.yaml")
    msg = str(e.value)
    # A retriever deployment runs (and asks for its 0.1 CPU) only when the models do not hold the index.
    assert msg.startswith(f"serve.yaml: the deployments ask for {3.1 if colocate else 3.2:g} CPU(s)")
    assert ("retriever 1 x 0.1 CPU" in msg) != colocate
    for part in ("dense 1 x 1 CPU", "sparse 1 x 1 CPU", "reranker 1 x 1 CPU", "ingress 1 x 0.1 CPU",
                 "the cluster has 2 CPU(s)", "leave num_cpus unset"):
        assert part in msg
    # a replica larger than any node, although the cluster's total would hold it
    big = _serve(dense={"model": "a", "num_cpus": 20})
    with pytest.raises(ConfigError, match="one replica of dense is larger than any node"):
        check_fits(sized(big, TWO_BIG_NODES), TWO_BIG_NODES)
    gpu = _serve(dense={"model": "a", "num_gpus": 1, "num_replicas": 3})
    with pytest.raises(ConfigError, match=r"and 3 GPU\(s\)"):
        check_fits(sized(gpu, TWO_BIG_NODES), TWO_BIG_NODES)


@pytest.mark.parametrize("model,path", [
    ("raytrieve.serve.config:ServeConfig", {"dense": {"model": "a", "torch_threads": 0}}),
    ("raytrieve.inference.config:EncodeConfig", {"corpus": {"path": "c.parquet"}, "output_dir": "o",
                                                 "dense": {"model": "a"}, "compute": {"torch_threads": 0}}),
    ("raytrieve.demo.config:DemoConfig", {"serving": {"torch_threads": 0}}),
])
def test_zero_torch_threads_is_refused_naming_the_key(model, path):
    """0 would otherwise read as 'unset' (the sized default) or reach torch.set_num_threads."""
    import importlib

    module, name = model.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=r"torch_threads.*greater than or equal to 1"):
        from_dict(cls, path, where="test")
