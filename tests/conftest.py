"""Shared fixtures: tiny random models built from a config, the shipped pretrained models,
and the sentence-transformers oracle (imported once per session: it takes ~10 s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hypothesis: `make test` runs a bounded number of examples per property (the suite's time
# budget); HYPOTHESIS_PROFILE=thorough runs many more (README: "Testing"). Tests that need a
# floor or ceiling of their own scale from the profile's max_examples, never fix it.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

from raytrieve.ray_cluster import free_port  # noqa: E402  (tests import it from here)

_hypothesis_settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
_hypothesis_settings.register_profile("thorough", max_examples=2000, deadline=None)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Real sentences of varied length (from the sentence-transformers and Python docs and news
# style text), enough to exercise padding, truncation and sorting.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "Return a new sorted list from the items in iterable. Has two optional arguments which must be "
    "specified as keyword arguments. key specifies a function of one argument that is used to extract "
    "a comparison key from each element in iterable.",
    "hi",
    "The quick brown fox jumps over the lazy dog " * 40,
    "Python’s ünïcode handling — with emoji 🙂 and CJK 漢字 — must survive tokenization.",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="session")
def st():
    import sentence_transformers

    return sentence_transformers


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from raytrieve.model_ref import resolve_model

    return resolve_model("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def splade_dir() -> Path:
    from raytrieve.model_ref import resolve_model

    return resolve_model("splade-tiny")


@pytest.fixture(scope="session")
def reranker_dir() -> Path:
    from raytrieve.model_ref import resolve_model

    return resolve_model("ms-marco-minilm-l12-v2")


@pytest.fixture(scope="session")
def s3_store():
    """An S3 API server on 127.0.0.1 with one bucket (tests/object_store.py)."""
    from tests.object_store import s3_server

    with s3_server() as store:
        yield store


def assert_grads_close(got, want, msg: str = "") -> None:
    """A float32 gradient against sentence-transformers': each entry within 1e-4 relative, or
    within 4e-5 of the largest entry of its row (of the tensor, for a vector), floored at 1.
    Float32 rounding grows with the size of what is summed, and its order differs between CPUs:
    sparse losses give gradients of 1e4, whose rounding (up to 1.2e-5 of the row's largest entry
    on an AMD EPYC) is far above a fixed 1e-5. An entry routed wrongly is off by its own size."""
    assert got.shape == want.shape, msg
    scale = want.abs().amax(dim=-1, keepdim=True) if want.dim() > 1 else want.abs().max()
    atol = 4e-5 * scale.clamp_min(1.0)
    bad = (got - want).abs() > atol + 1e-4 * want.abs()
    assert not bool(bad.any()), (
        f"{msg}: {int(bad.sum())} of {want.numel()} entries differ; largest difference "
        f"{float((got - want).abs().max()):.3g}, largest entry {float(want.abs().max()):.3g}"
    )


def tiny_bert_config(**changes):
    """The tests' tiny BERT (2 layers x 32 over the MiniLM vocabulary); ``changes`` override."""
    from transformers import BertConfig

    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**{**settings, **changes})


# Dropout off: losses compared with sentence-transformers see the same activations.
NO_DROPOUT = {"max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """Tiny random BERTs (2 layers x 32) over the MiniLM vocabulary: base, masked-LM, classifiers."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    out = {}
    for name, build in {
        "base": lambda: BertModel(tiny_bert_config()),
        "mlm": lambda: BertForMaskedLM(tiny_bert_config()),
        "cls1": lambda: BertForSequenceClassification(tiny_bert_config(num_labels=1)),
        "cls3": lambda: BertForSequenceClassification(tiny_bert_config(num_labels=3)),
        # Weights 10x the default spread: the default classifier scores every pair 0.501 +- 1e-5,
        # too flat to tell two truncation lengths apart.
        "cls1_spread": lambda: BertForSequenceClassification(tiny_bert_config(num_labels=1, initializer_range=0.2)),
    }.items():
        torch.manual_seed(0)
        model = build()
        d = root / name
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = d
    return out


def state_address() -> str:
    """The dashboard of the Ray this process is connected to, for Ray's state API
    (``ray.util.state``): without an address, the state API refuses to choose when another Ray
    runs on the host ("Found multiple active Ray instances")."""
    from ray._private.worker import get_dashboard_url

    return f"http://{get_dashboard_url()}"


_TCP_STATES = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def sockets_on(port: int) -> set[tuple[str, int]]:
    """(state, remote port) of every IPv4 TCP socket bound to local ``port`` (Linux /proc/net/tcp)."""
    held = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == port:
            held.add((_TCP_STATES.get(state, state), int(remote.split(":")[1], 16)))
    return held


@pytest.fixture(scope="session")
def _ray_session():
    """One embedded local Ray per test session (never joins a stray cluster on the host):
    the ``ray`` module and the dashboard URL ``connect`` returned."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from raytrieve.ray_cluster import connect

    # Job entrypoints (`ray job submit -- python jobs/train.py`) run `python` from the PATH Ray's
    # processes inherit: make it this venv's, as a cluster image has raytrieve's dependencies
    # (cluster/local.sh does the same for a head it starts).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Ray Train's controller polls its workers every 2 s by default, so each run would end up to
    # two polls after its last step; the tests' runs last seconds, so poll more often. In this
    # process's environment, not only the session's runtime env: Ray Train reads it from the
    # driver's, and the drivers the tests start (jobs/train.py joined to this cluster, `ray job
    # submit`, whose driver the head started from this environment) have their own runtime env.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # A node whose raylet is gone (the kill tests' second node) is declared dead after 5 failed
    # health checks; Ray checks every 3 s, so a job waited ~15 s before its lost tasks moved to
    # the head. Checking every 1 s finds it in ~5 s. A dead raylet fails a check at once
    # (connection refused); one that is merely slow on a loaded host still gets the 10 s
    # timeout per check, so a busy node is no likelier to be declared dead. Read by the GCS
    # this process starts.
    os.environ.setdefault("RAY_health_check_period_ms", "1000")
    # The embedded start users get (raytrieve.ray_cluster: its dashboard serves Ray's state API).
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    dashboard = connect("local", num_cpus=2, log_to_driver=False, runtime_env={"env_vars": env})
    assert dashboard is not None, "the embedded Ray runs a dashboard"
    yield ray, dashboard
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(_ray_session):
    """The session's Ray (the ``ray`` module, initialised)."""
    return _ray_session[0]


@pytest.fixture(scope="session")
def ray_dashboard(_ray_session) -> str:
    """The session cluster's dashboard, which is also its job server (`ray job submit --address`)."""
    return _ray_session[1]


class SecondNode:
    """A second Ray node on this host joined to the session's cluster (cluster/local.sh join):
    its own raylet, object store and workers, a custom resource ``node2`` and one CPU. Its
    processes log under ``temp_dir/session_*/logs`` (what ran there can be read back)."""

    def __init__(self, ray, temp_dir: Path, cpus: int = 1, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys
        import time

        bin_dir = Path(sys.executable).parent
        root = Path(__file__).resolve().parents[1]
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        # The session's Ray holds the default agent ports: give this node free ones.
        self.temp_dir = temp_dir
        extra = " ".join([f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port")] + [f"--temp-dir={temp_dir}",
                                           f"--node-ip-address={ray.util.get_node_ip_address()}"])
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_BIN": str(bin_dir / "ray"), "RAY_BLOCK": "1",
               "RAY_NUM_CPUS": str(cpus), "RAY_RESOURCES": '{"node2": 1}', "RAY_EXTRA_ARGS": extra,
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.process = subprocess.Popen(
            ["bash", str(root / "cluster" / "local.sh"), "join", ray.get_runtime_context().gcs_address],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
            if new:
                self.node_id = new[0]["NodeID"]
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.kill()
        raise RuntimeError("the second Ray node did not join the session's cluster")

    def kill(self) -> None:
        """SIGKILL the node's whole process group (raylet, object store, workers): a lost machine."""
        import signal

        import time

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.time() + 10
        while time.time() < deadline:  # every process of the node is gone, workers included
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise RuntimeError("processes of the second Ray node survived SIGKILL of its process group")


@pytest.fixture
def second_node(ray_cluster, tmp_path_factory):
    """A real second node for data-plane and kill tests; killed at the end (never `ray stop`).
    Its RAYTRIEVE_CACHE (``node.cache``) is its own, as another machine's would be."""
    cache = tmp_path_factory.mktemp("node2-cache")
    node = SecondNode(ray_cluster, tmp_path_factory.mktemp("node2"), env={"RAYTRIEVE_CACHE": str(cache)})
    node.cache = cache
    yield node
    node.kill()


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Tiny sentence-transformers folders of each kind, for training runs: dense (mean pooling),
    sparse (SPLADE), router (inference-free SPLADE: static query side, MLM document side), cross."""
    import torch

    from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
    from raytrieve.modules import MLMTransformer, Pooling, Router, SparseStaticEmbedding, SpladePooling, Transformer

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    DenseEncoder([Transformer.from_pretrained(tiny_dirs["base"], max_seq_length=24), Pooling(32, "mean")],
                 device="cpu").save(root / "dense")
    mlm = MLMTransformer.from_pretrained(tiny_dirs["mlm"], max_seq_length=24)
    SparseEncoder([mlm, SpladePooling("max")], device="cpu").save(root / "sparse")
    static = SparseStaticEmbedding(mlm.tokenizer, weight=torch.rand(30522))
    SparseEncoder([Router.for_query_document([static], [mlm, SpladePooling("max")])], device="cpu").save(root / "router")
    CrossEncoder(tiny_dirs["cls1"], device="cpu").save(root / "cross")
    return {k: root / k for k in ("dense", "sparse", "router", "cross")}


# Fixtures that start (or join) Ray: a test using one is `slow`, whatever its file says.
RAY_FIXTURES = {"ray_cluster", "ray_dashboard", "second_node", "big_second_node"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # Tests without Ray run first when one pytest runs them all: before Ray's daemons start and
    # share the two cores with them. (`make test` runs the two parts side by side: run_suite.py.)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


# A Ray test's timeout. pytest-timeout's default arms SIGALRM, whose handler never runs while the
# main thread waits in ray.get (measured: not within 60 s; SIGINT does interrupt it): a Ray test
# stuck there (a run waiting for CPUs a stopped run kept reserved) hung the suite until CI's own
# limit. Here a timer thread prints every thread's stack and sends SIGINT: the test fails as
# interrupted, the session's fixtures tear down (its Ray stops) and the run ends, within minutes.
def pytest_timeout_set_timer(item, settings):
    if item.get_closest_marker("slow") is None or not settings.timeout or settings.timeout <= 0:
        return None  # pytest-timeout's own

    import threading

    ended = threading.Event()

    def expire() -> None:
        import faulthandler
        import signal
        import tempfile

        with tempfile.TemporaryFile("w+") as stacks:  # pytest captures stderr, and drops it on an interrupt
            faulthandler.dump_traceback(file=stacks)
            stacks.seek(0)
            report = item.config.pluginmanager.get_plugin("terminalreporter")
            with item.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
                report.write_line(f"\n+++ {item.nodeid}: over its {settings.timeout:g} s timeout; every thread's "
                                  f"stack, then SIGINT +++\n{stacks.read()}")
        if not ended.is_set():  # the test ended meanwhile: its SIGINT would hit the next one
            os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(settings.timeout, expire)
    timer.daemon = True
    timer.start()

    def cancel() -> None:  # what pytest-timeout's own cancel hook calls, as the test ends
        ended.set()
        timer.cancel()
        if timer is not threading.current_thread():
            timer.join()

    item.cancel_timeout = cancel
    return True


# RAYTRIEVE_TEST_PROFILE=FILE: one line per test with its wall seconds, the CPU seconds of this
# process and every process descended from it (Ray's daemons and workers included, which pytest's
# own rusage misses), and the CPU seconds the whole host spent meanwhile (anything else running
# included). A thread samples the process tree 4 times a second; a process keeps the CPU time it
# was last seen with after it exits. How the suite's time was found (README: "Testing"); off by
# default.
_PROFILE = os.environ.get("RAYTRIEVE_TEST_PROFILE")


def _host_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _TreeCpu:
    def __init__(self) -> None:
        import threading

        self.seen: dict[tuple[int, str], int] = {}  # (pid, start time) -> CPU ticks when last seen
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def sample(self) -> float:
        procs: dict[int, tuple[int, str, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                procs[int(name)] = (int(fields[1]), fields[19], int(fields[11]) + int(fields[12]))
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in procs.items():
            children.setdefault(parent, []).append(pid)
        todo = [os.getpid()]
        with self.lock:
            while todo:
                pid = todo.pop()
                if pid in procs:
                    self.seen[(pid, procs[pid][1])] = procs[pid][2]
                todo.extend(children.get(pid, []))
            return sum(self.seen.values()) / os.sysconf("SC_CLK_TCK")

    def _loop(self) -> None:
        import time

        while True:
            time.sleep(0.25)
            self.sample()


if _PROFILE:
    import time as _time

    _tree = _TreeCpu()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        wall, tree, busy = _time.perf_counter(), _tree.sample(), _host_busy_seconds()
        yield
        with open(_PROFILE, "a") as f:
            f.write(f"{_time.perf_counter() - wall:.2f}\t{_tree.sample() - tree:.2f}\t"
                    f"{_host_busy_seconds() - busy:.2f}\t{item.nodeid}\n")


@pytest.fixture(scope="session")
def registry(tiny_models, tmp_path_factory):
    """A real MLflow registry (sqlite) holding the tiny dense model as tiny-dense/1, registered
    as training does it: the folder is the run's ``model`` artifact, then a new version."""
    from raytrieve.tracking import mlflow_run

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    # An explicit artifact location: sqlite's default would write ./mlruns into the checkout.
    mlflow_run.client(uri).create_experiment("encode-tests", artifact_location=(root / "artifacts").as_uri())
    found = {"uri": uri, "cache": root / "cache"}
    assert register_model(found, tiny_models["dense"], "tiny-dense") == "models:/tiny-dense/1"
    return found


def register_model(registry: dict, folder: Path, name: str) -> str:
    """``folder`` registered in the ``registry`` fixture's store as a new version of ``name``."""
    from raytrieve.tracking import mlflow_run

    uri = registry["uri"]
    run_id = mlflow_run.start_run(uri, "encode-tests", name, {}, {})
    mlflow_run.MetricLogger(uri, run_id).log_model_dir(folder)
    mlflow_run.end_run(uri, run_id, "FINISHED")
    return f"models:/{name}/{mlflow_run.register_model(uri, run_id, name)}"
