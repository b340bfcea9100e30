"""The encoding job on two real Ray nodes on this host: encode actors on both write shards
straight to the output, and losing the second node mid-job (its raylet, object store and
workers SIGKILLed) followed by a rerun gives every id exactly once with the right vectors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raytrieve.inference.shards import read_vectors
from tests.conftest import SENTENCES, SecondNode
from tests.train_helpers import ROOT


def _sidecars(out: Path) -> list[dict]:
    found = []
    for p in out.glob("part-*.json"):
        try:
            found.append(json.loads(p.read_text()))
        except json.JSONDecodeError:  # being renamed into place right now
            pass
    return found


@pytest.fixture
def big_second_node(ray_cluster, tmp_path_factory):
    """A second node of 2 CPUs: with encode actors of 1.5 CPUs, each node holds exactly one."""
    node = SecondNode(ray_cluster, tmp_path_factory.mktemp("node2"), cpus=2)
    yield node
    node.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_write_shards_and_a_lost_node_reruns_exactly_once(ray_cluster, big_second_node, tiny_models,
                                                                       tmp_path):
    from raytrieve.encoders import DenseEncoder

    second_node = big_second_node
    # 30 shards: each node writes one within the first few (both encode actors are up before work
    # starts), so the kill still lands mid-job, and the head finishes the rest alone in seconds.
    n = 300
    texts = [f"{SENTENCES[i % len(SENTENCES)]} (item {i})" for i in range(n)]
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(n)], "text": texts}), tmp_path / "corpus.parquet")
    out = tmp_path / "vectors"
    # Two encode actors of 1.5 CPUs on two nodes of 2 CPUs: one runs on each node, wherever
    # the half-CPU reader lands.
    config = {"corpus": {"path": str(tmp_path / "corpus.parquet")}, "output_dir": str(out), "rows_per_shard": 10,
              "dense": {"model": str(tiny_models["dense"]), "dtype": "float32"},
              "compute": {"encode_actors": 2, "cpus_per_encode_actor": 1.5, "torch_threads": 1, "token_budget": 256}}
    config_path = tmp_path / "encode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT / "platform")}
    command = [sys.executable, str(ROOT / "jobs" / "encode.py"), "--config", str(config_path)]
    head = ray_cluster.get_runtime_context().get_node_id()

    # The first run starts work only once both encode actors are up: a new node's first worker
    # (torch, the model) can take longer to start than this small job takes on the head.
    driver = subprocess.Popen(command, env={**env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        nodes = [s["node"] for s in _sidecars(out)]
        # Kill as soon as each node has written: waiting for more let the head finish the job
        # first on a slow run (the node was then not lost mid-job).
        if nodes.count(second_node.node_id) >= 1 and nodes.count(head) >= 1:
            break
        time.sleep(0.1)
    written = {s["node"] for s in _sidecars(out)}
    assert {head, second_node.node_id} <= written, "both nodes write shards"
    assert len(_sidecars(out)) < n // 10, "the node is lost mid-job"
    second_node.kill()
    try:  # the job may finish on the head alone, or wait for a node that never returns
        driver.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] + summary["shards_reused"] == n // 10
    v = read_vectors(out)
    assert v.ids == [f"doc-{i}" for i in range(n)]
    np.testing.assert_allclose(v.dense, DenseEncoder(tiny_models["dense"]).encode_document(
        texts, normalize_embeddings=True), atol=1e-5)
    assert not list(out.glob(".*.tmp-*"))
