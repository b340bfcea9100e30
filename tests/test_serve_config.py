"""Several models per Serve application, without Ray: the config (one deployment or a list per
kind, names, indices, sizing, the search: defaults) and the ingress's model table (which
deployment a request's model names, /search over the models it picks, each with its index),
driven with in-process stand-ins for the deployment handles."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.serve.config import LimitsConfig, SearchDefaults, ServeConfig, check_fits, search_limit_error, sized
from raytrieve.serve.http_guard import ApiError
from raytrieve.serve.schemas import SearchRequest
from raytrieve.serve.shapes import check_search_limits
from raytrieve.sizing import ClusterShape


def _cfg(**keys) -> ServeConfig:
    return from_dict(ServeConfig, keys, where="serve.yaml")


def _refused(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**keys)


TWO_DENSE = {
    "dense": [{"model": "all-minilm-l6-v2", "index": "/idx/minilm"}, {"model": "bge", "name": "b", "index": "/idx/b"}],
    "sparse": {"model": "splade-tiny"},
    "reranker": [{"model": "ms-marco-minilm-l12-v2"}, {"model": "tiny-cross", "name": "small"}],
    "index": "/idx/minilm",
}


def test_a_kind_takes_one_deployment_or_a_list_and_the_first_is_the_default():
    one = _cfg(dense={"model": "m"}, index="/idx")
    assert one.dense.model == "m"  # type: ignore[union-attr]  (a single deployment stays one)
    assert [(m.kind, m.path, m.deployment, m.name, m.index, m.default) for m in one.served()] == [
        ("dense", "dense", "dense", "m", "/idx", True)
    ]
    cfg = _cfg(**TWO_DENSE)
    assert [(m.path, m.deployment, m.name, m.index, m.default) for m in cfg.served()] == [
        ("dense[0]", "dense", "all-minilm-l6-v2", "/idx/minilm", True),
        ("dense[1]", "dense-b", "b", "/idx/b", False),
        ("sparse", "sparse", "splade-tiny", "/idx/minilm", True),  # the top-level index: the default's
        ("reranker[0]", "reranker", "ms-marco-minilm-l12-v2", None, True),
        ("reranker[1]", "reranker-small", "small", None, False),
    ]
    assert cfg.default("reranker").model == "ms-marco-minilm-l12-v2"  # type: ignore[union-attr]
    # A dump loads again into the same config, each key in its own shape.
    assert _cfg(**cfg.model_dump()) == cfg and isinstance(cfg.model_dump()["sparse"], dict)


def test_names_must_be_distinct_and_errors_name_the_keys():
    _refused({"dense": [{"model": "m"}, {"model": "m"}]}, r"serve.yaml: dense\[0\] and dense\[1\] share the name 'm'")
    _refused(
        {"dense": {"model": "m"}, "reranker": [{"model": "r"}, {"model": "x", "name": "m"}]},
        r"dense and reranker\[1\] share the name 'm'.*set a distinct name",
    )
    _refused({"dense": []}, "serve.yaml.dense: an empty list")
    # pydantic's errors name the key in the shape given, not each shape it tried.
    _refused(
        {"dense": [{"model": "m"}, {"model": "n", "replicas": 2}]},
        r"^serve.yaml.dense\[1\]: unknown key\(s\) \['replicas'\]; valid keys",
    )
    _refused({"dense": {"name": "x"}}, r"^serve.yaml.dense: missing required key 'model'$")
    _refused({"dense": 5}, r"^serve.yaml.dense: expected a mapping or a list of mappings, got 5$")


def test_index_rules():
    _refused({"reranker": [{"model": "r", "index": "/i"}]}, r"reranker\[0\].index: a reranker has no index")
    _refused(
        {"dense": [{"model": "a"}, {"model": "b", "index": "/i"}]},
        r"serve.yaml.dense\[0\]: dense\[1\] has an index but the default dense model .* has none",
    )
    _refused({"dense": {"model": "a", "index": "/j"}, "index": "/i"}, "serve.yaml.index: no model searches it")
    _refused({"reranker": {"model": "r"}, "index": "/i"}, "index needs a dense: or sparse: model")
    # Each default without an index of its own gets the top-level one; the others none.
    cfg = _cfg(dense=[{"model": "a", "index": "/a"}, {"model": "b"}], sparse={"model": "s"}, index="/i")
    assert [m.index for m in cfg.served()] == ["/a", None, "/i"]


def test_search_limits_are_one_rule_for_the_config_and_the_requests():
    limits = LimitsConfig(max_top_k=20, max_recall=150, max_rerank_depth=30)
    cases = [
        ({"top_k": 21}, "top_k"),
        ({"recall": {"sparse": 151}}, "recall.sparse"),
        ({"rerank": True, "rerank_depth": 31}, "rerank_depth"),
    ]
    for fields, field in cases:
        request = SearchRequest.model_validate({"query": "q", **fields})
        assert search_limit_error(request, limits)[0] == field  # type: ignore[index]
        assert search_limit_error(SearchDefaults.model_validate(fields), limits)[0] == field  # type: ignore[index]
        with pytest.raises(ApiError) as e:
            check_search_limits(request, limits)
        assert (e.value.status, e.value.field) == (422, field)
        _refused(
            {"dense": {"model": "m"}, "limits": limits.model_dump(), "search": fields}, f"serve.yaml.search.{field}: "
        )
    assert search_limit_error(SearchRequest(query="q", rerank_depth=31), limits) is None  # no rerank: not checked
    # The config's default depth is every reranking request's that names none: checked with
    # search.rerank false too (it started, then refused each {"rerank": true} naming rerank_depth).
    _refused({"dense": {"model": "m"}, "reranker": {"model": "r"}, "limits": limits.model_dump(),
              "search": {"rerank_depth": 31}}, r"serve.yaml.search.rerank_depth: exceeds limits.max_rerank_depth \(30\), got 31")
    # Without a reranker no request reranks: a small max_rerank_depth is no reason to refuse.
    _cfg(dense={"model": "m"}, limits={"max_rerank_depth": 20})


def test_search_defaults_that_switch_off_every_served_retriever_are_refused():
    both = {"dense": {"model": "m"}, "sparse": {"model": "s"}, "index": "/i"}
    _refused(
        {**both, "search": {"recall": {"dense": 0, "sparse": 0}}},
        r"serve.yaml.search.recall: every served retriever is switched off \(dense: 0, sparse: 0\).*dense or sparse",
    )
    assert _cfg(**both, search={"recall": {"dense": 0}}).search.recall.sparse == 100  # one left on
    # Without an index there is no /search to switch off; a kind not served does not count.
    assert _cfg(dense={"model": "m"}, search={"recall": {"dense": 0}})
    _refused(
        {"dense": {"model": "m"}, "index": "/i", "search": {"recall": {"dense": 0, "sparse": 7}}},
        r"switched off \(dense: 0\)",
    )


@pytest.mark.parametrize("colocate", [True, False])
def test_sizing_and_fit_count_every_deployment(colocate):
    cfg = sized(_cfg(**TWO_DENSE, colocate_index=colocate), ClusterShape(cpus=4, largest_node_cpus=4))
    specs = [m.spec for m in cfg.served()]
    # (4 - 0.1 ingress [- 0.1 retriever]) / 5, in steps of 0.05 -> 0.75 either way
    assert len(specs) == 5 and all(d.num_cpus == pytest.approx(0.75) for d in specs)
    assert isinstance(cfg.dense, list) and not isinstance(cfg.sparse, list)  # each key keeps its shape
    check_fits(cfg, ClusterShape(cpus=4, largest_node_cpus=4))
    asks = "3.85" if colocate else "3.95"
    with pytest.raises(ConfigError, match=rf"ask for {asks} CPU.*dense-b 1 x 0.75 CPU.*reranker-small 1 x 0.75 CPU"):
        check_fits(cfg, ClusterShape(cpus=2, largest_node_cpus=2))


def test_direct_ingress_moves_the_proxy_and_holds_one_ingress_replica_per_node():
    """The ingress replica answers ``port`` itself and Serve's proxy takes the next one; a node
    holds one such replica, so more ingress replicas than nodes are refused before deploying,
    and `serve deploy` (app_builder), which cannot set Serve up for it, refuses the key."""
    from raytrieve.serve.app import app_builder
    from raytrieve.serve.launch import direct_ingress_controller_env

    assert (_cfg(dense={"model": "m"}, port=9000).proxy_port, _cfg(dense={"model": "m"}, port=9000,
                                                                     direct_ingress=True).proxy_port) == (9000, 9001)
    _refused({"dense": {"model": "m"}, "port": 65535, "direct_ingress": True}, r"serve.yaml.port: .*port \+ 1")
    # The controller's range, read by Ray's own port allocator, hands out the port and nothing else.
    from ray.serve._private.node_port_manager import NoAvailablePortError, PortAllocator

    env = direct_ingress_controller_env(9000)
    ports = PortAllocator(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                          int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]), "HTTP", "node")
    assert ports.allocate("replica-a") == 9000
    with pytest.raises(NoAvailablePortError):
        ports.allocate("replica-b")
    two = sized(_cfg(dense={"model": "m"}, ingress_replicas=2, direct_ingress=True), ClusterShape(4, 2, nodes=2))
    check_fits(two, ClusterShape(4, 2, nodes=2))
    with pytest.raises(ConfigError, match=r"cfg.ingress_replicas: 2 with direct_ingress, but the cluster has 1 node"):
        check_fits(two, ClusterShape(4, 4, nodes=1), "cfg")
    check_fits(two.model_copy(update={"direct_ingress": False}), ClusterShape(4, 4, nodes=1))  # the proxy spreads them
    with pytest.raises(ConfigError, match=r"serve args.direct_ingress: true .* under `serve deploy` set it to false"):
        app_builder({"dense": {"model": "m"}, "direct_ingress": True})



def test_serve_deploy_checks_the_config_as_raytrieve_serve_does(minilm_dir, tmp_path):
    """`serve deploy`'s builder refuses, before any deployment, what `raytrieve serve` refuses
    before starting: a max_seq_length past the model's position table, a model that is not there."""
    from raytrieve.serve.app import app_builder

    with pytest.raises(ConfigError, match=r"serve args.dense.max_seq_length: 1000 is more than the 512 positions"):
        app_builder({"dense": {"model": str(minilm_dir), "max_seq_length": 1000}})
    with pytest.raises(ConfigError, match=r"serve args.reranker.model: .*no_such_model"):
        app_builder({"dense": {"model": str(minilm_dir)}, "reranker": {"model": str(tmp_path / "no_such_model")}})
    # A dense model as the reranker crashed every reranker replica in Ray, then a traceback.
    with pytest.raises(ConfigError, match=r"serve args.reranker.model: .* is a dense model \(SentenceTransformer, by "
                                          r"the files in .*\); serve it under dense:, or name a reranker model"):
        app_builder({"dense": {"model": str(minilm_dir)}, "reranker": {"model": str(minilm_dir), "name": "r"}})
    with pytest.raises(ConfigError, match=r"serve args.host: '0.0.0.0.0' is neither an address nor a name that "
                                          r"resolves"):
        app_builder({"dense": {"model": str(minilm_dir)}, "host": "0.0.0.0.0"})


def test_raytrieve_serve_refuses_a_port_in_use_before_ray_starts(minilm_dir, monkeypatch):
    """The port was checked only after the embedded Ray had started (~20 s)."""
    import socket

    from raytrieve import ray_cluster
    from raytrieve.config import from_dict
    from raytrieve.serve.config import ServeConfig
    from raytrieve.serve.launch import start

    monkeypatch.setattr(ray_cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the port check"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        cfg = from_dict(ServeConfig, {"dense": {"model": str(minilm_dir)}, "port": port})
        with pytest.raises(ConfigError, match=rf"serve.yaml.port: 127.0.0.1:{port} is already in use; pick a free"):
            start(cfg, "serve.yaml")
    # With direct_ingress Serve's proxy takes port + 1: taken, the error says whose port it is.
    for _ in range(50):
        with socket.socket() as server, socket.socket() as below:
            server.bind(("127.0.0.1", 0))
            port = server.getsockname()[1]
            try:
                below.bind(("127.0.0.1", port - 1))  # the app's port must be free
            except OSError:
                continue
            below.close()
            server.listen()
            cfg = from_dict(ServeConfig, {"dense": {"model": str(minilm_dir)}, "port": port - 1, "direct_ingress": True})
            with pytest.raises(ConfigError, match=rf"serve.yaml.port: 127.0.0.1:{port} \(Serve's HTTP proxy's: with "
                                                  rf"direct_ingress it takes port \+ 1, {port - 1} \+ 1\) is already"):
                start(cfg, "serve.yaml")
            break
    else:
        pytest.fail("no port below a free one was free in 50 tries")


def test_the_direct_ingress_port_waits_for_closed_connections_and_refuses_a_listener():
    """Ray binds the ingress replica's port without SO_REUSEADDR: a connection its server closed
    (TIME_WAIT) blocks the bind as a listener does. The first is waited for, the second refused."""
    import socket

    from raytrieve.serve.launch import wait_port_released

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cfg.port: 127.0.0.1:{port} is already in use"):
            wait_port_released("127.0.0.1", port, "cfg.port")
    for host in ("127.0.0.1", "0.0.0.0"):  # the replica binds cfg.host: the test bind is the same
        with socket.socket() as server:
            server.bind((host, 0))
            server.listen()
            port = server.getsockname()[1]
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = server.accept()
            conn.close()  # the server's side closes first: its end of the connection lingers
            client.close()
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind((host, port))  # the kernel's word: not bindable yet
        with pytest.raises(ConfigError, match=rf"cfg.port: {host}:{port} was not released in 0.5 s"):
            wait_port_released(host, port, "cfg.port", timeout_s=0.5)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    wait_port_released("127.0.0.1", port, "cfg.port", timeout_s=0)  # a port nothing holds: at once
    with pytest.raises(ConfigError, match=r"cfg.port: 198.51.100.77 is not an address of this machine"):
        wait_port_released("198.51.100.77", port, "cfg.port")
    # This Serve's own direct-ingress port: its last replica may still listen while it stops
    # (measured: after serve.delete returned, the next deploy was refused). It is waited for; a
    # listener that stays is refused once the wait is over.
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    threading.Timer(1.5, server.close).start()
    started = time.monotonic()
    wait_port_released("127.0.0.1", port, "cfg.port", timeout_s=30, replica_may_linger=True)
    assert 1.4 < time.monotonic() - started < 30
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cfg.port: 127.0.0.1:{port} is already in use"):
            wait_port_released("127.0.0.1", port, "cfg.port", timeout_s=1, replica_may_linger=True)


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_host_is_checked_in_its_own_family():
    """`host: "::1"` (and the IPv6 wildcard "::") is probed over IPv6: the port check had opened an
    IPv4 socket for every host, and `raytrieve serve` died on ::1 with a socket.gaierror before
    starting (run by hand since: it served and answered on [::1]; README, Serving)."""
    import socket

    from raytrieve.serve.launch import check_port_free, check_ports_free, wait_port_released

    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen()
        port = server.getsockname()[1]
        for host in ("::1", "::"):  # the wildcard: a client here reaches it on ::1
            with pytest.raises(ConfigError, match=rf"cfg.port: {host}:{port} is already in use"):
                check_port_free(host, port, "cfg.port")
        check_port_free("127.0.0.1", port, "cfg.port")  # nothing listens on IPv4's port
        with pytest.raises(ConfigError, match=rf"serve.yaml.port: ::1:{port} is already in use"):
            check_ports_free(_cfg(dense={"model": "d"}, host="::1", port=port), "serve.yaml")
    check_port_free("::1", port, "cfg.port")  # closed: free again
    wait_port_released("::1", port, "cfg.port", timeout_s=0)
    with pytest.raises(ConfigError, match=r"cfg.port: host 'no-such-host.invalid' does not resolve"):
        check_port_free("no-such-host.invalid", port, "cfg.port")


def test_a_reranker_gets_a_nodes_cpus_as_threads_beside_its_cpu_share():
    """The reranker runs after recall, so its threads default to one node's CPUs shared among the
    reranker replicas (at most 4); the query encoders keep their share's; a set value wins."""
    shipped = {"dense": {"model": "d"}, "sparse": {"model": "s"}, "reranker": {"model": "r"}, "index": "/i"}
    threads = {m.kind: m.spec.torch_threads for m in sized(_cfg(**shipped), ClusterShape(2, 2)).served()}
    assert threads == {"dense": 1, "sparse": 1, "reranker": 2}  # 0.6 CPU each on 2 cores
    big = sized(_cfg(**shipped), ClusterShape(cpus=16, largest_node_cpus=8))
    assert [m.spec.torch_threads for m in big.served()] == [4, 4, 4]  # 4 CPUs each, capped at 4
    two = sized(_cfg(**TWO_DENSE), ClusterShape(cpus=4, largest_node_cpus=4))
    assert [m.spec.torch_threads for m in two.served() if m.kind == "reranker"] == [2, 2]  # 4 CPUs, 2 rerankers
    fixed = {**shipped, "reranker": {"model": "r", "torch_threads": 1}}
    assert sized(_cfg(**fixed), ClusterShape(2, 2)).served()[-1].spec.torch_threads == 1
    replicated = {**shipped, "reranker": {"model": "r", "num_replicas": 3}}
    assert sized(_cfg(**replicated), ClusterShape(6, 6)).served()[-1].spec.torch_threads == 2  # share 1.15; 6 / 3
    # An autoscaling reranker shares the node among as many replicas as it may scale to: 4 / 4.
    scaling = {**shipped, "reranker": {"model": "r", "autoscaling": {"min_replicas": 1, "max_replicas": 4}}}
    assert sized(_cfg(**scaling), ClusterShape(4, 4)).served()[-1].spec.torch_threads == 1


# -- The model table over stand-in handles ------------------------------------------------------


class Call:
    """A stand-in for a deployment handle (or one of its methods): ``remote`` awaits ``fn``."""

    def __init__(self, fn, **methods) -> None:
        self.fn = fn
        for name, method in methods.items():
            setattr(self, name, Call(method))

    async def remote(self, *args):
        return self.fn(*args)


def _table(layout: str = "replica"):
    """``layout`` replica: each model's stand-in holds its own index (and refuses another's), as
    ``ModelReplica`` does with ``colocate_index``; retriever: a retriever stand-in holds them all;
    ingress: stand-ins of this process's ``ModelRunner``s hold them (``recall_in_ingress``), and
    the model handles have no index."""
    from raytrieve.serve.models import ModelTable

    colocate = layout == "replica"
    cfg = _cfg(**TWO_DENSE, colocate_index=layout != "retriever", recall_in_ingress=layout == "ingress")
    # Each dense model embeds a query as its own vector; each index holds documents only that
    # model's vector finds first. The reranker scores by text length (small: the opposite).
    vectors = {"all-minilm-l6-v2": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    docs = {"/idx/minilm": {"a1": [1.0, 0.0], "a2": [0.5, 0.5]}, "/idx/b": {"b1": [0.0, 1.0], "b2": [0.1, 0.2]}}
    length = {"a1": 1, "a2": 3, "b1": 2, "b2": 1}

    def search(folder, kind, vector, k):
        if kind == "sparse":
            return [("a2", 1.0)]
        scored = sorted(((d, float(np.dot(v, vector))) for d, v in docs[folder].items()), key=lambda x: -x[1])
        return scored[:k]

    def search_with_texts(folder, kind, vector, k, n):  # the real Retriever's: the first n hits' texts along
        hits = search(folder, kind, vector, k)
        return hits, {d: "x" * length[d] for d, _ in hits[:n]}

    def lookup(ids):
        return ["x" * length[i] for i in ids]

    def model(encode, kind, folder):
        if not colocate:
            return Call(encode)

        def recall(query, k, n):  # its own index only (a search routed elsewhere finds no method)
            hits, texts = search_with_texts(folder, kind, encode([query], "query")[0][0], k, n)
            return hits, texts, 0.5

        return Call(encode, recall=recall, lookup=lookup)

    def dense(name, folder):
        return model(
            lambda texts, task=None, prompt=None: ([vectors[name]] * len(texts), [3] * len(texts)), "dense", folder
        )

    def reranker(sign):
        return Call(lambda pairs, task=None: ([sign * len(t) for _, t in pairs], [1] * len(pairs)))

    handles = {
        "dense": [dense("all-minilm-l6-v2", "/idx/minilm"), dense("b", "/idx/b")],
        "sparse": [model(lambda *a: ([None], [1]), "sparse", "/idx/minilm")],
        "reranker": [reranker(1), reranker(-1)],
    }
    retriever = (
        None if layout != "retriever" else Call(None, search=search, search_with_texts=search_with_texts, lookup=lookup)
    )
    local = {}
    if layout == "ingress":

        class Runner:  # a ModelRunner's recall (async) and lookup (plain), over the same index
            def __init__(self, encode, kind, folder) -> None:
                self.encode, self.kind, self.folder = encode, kind, folder

            async def recall(self, query, k, n):
                hits, texts = search_with_texts(self.folder, self.kind, self.encode([query], "query")[0][0], k, n)
                return hits, texts, 0.25

            def lookup(self, ids):
                return lookup(ids)

        local = {
            "all-minilm-l6-v2": Runner(handles["dense"][0].fn, "dense", "/idx/minilm"),
            "b": Runner(handles["dense"][1].fn, "dense", "/idx/b"),
            "splade-tiny": Runner(handles["sparse"][0].fn, "sparse", "/idx/minilm"),
        }
    return ModelTable(cfg, handles, retriever, local), handles


def test_requests_pick_their_model_by_name_and_unknown_names_are_4xx_naming_the_field():
    table, handles = _table()
    assert table.pick("dense", None)[1] is handles["dense"][0] and table.pick("dense", "b")[1] is handles["dense"][1]
    assert table.pick("reranker", "small")[1] is handles["reranker"][1]
    assert table.pick_any("small")[0].kind == "reranker" and table.pick_any(None)[0].name == "all-minilm-l6-v2"
    for requested, why in (("gpt-4", "no model 'gpt-4' is served here"), ("small", "'small' is a reranker model")):
        with pytest.raises(ApiError) as e:
            table.pick("dense", requested)
        assert (e.value.status, e.value.field, e.value.kind) == (404, "model", "model_not_found")
        assert why in e.value.message and "dense models here: ['all-minilm-l6-v2', 'b']" in e.value.message


def test_readiness_pings_every_deployment_but_a_model_that_scales_to_zero():
    """/healthz and /health ping each model's deployment and the retriever; a model that may
    autoscale to no replica is left out (a ping every few seconds would keep it awake)."""
    from raytrieve.serve.models import ModelTable

    keys = {**TWO_DENSE, "colocate_index": False}
    keys["reranker"] = [keys["reranker"][0], {**keys["reranker"][1], "autoscaling": {"min_replicas": 0}}]
    keys["dense"] = [keys["dense"][0], {**keys["dense"][1], "autoscaling": {"min_replicas": 1, "max_replicas": 2}}]
    cfg = _cfg(**keys)
    handles = {kind: [object() for m in cfg.served() if m.kind == kind] for kind in ("dense", "sparse", "reranker")}
    retriever = object()
    probed = ModelTable(cfg, handles, retriever).probed()
    assert [(kind, name) for kind, name, _ in probed] == [
        ("dense", "all-minilm-l6-v2"), ("dense", "b"), ("sparse", "splade-tiny"),
        ("reranker", "ms-marco-minilm-l12-v2"), ("retriever", "retriever")]
    assert [h for *_, h in probed] == [*handles["dense"], *handles["sparse"], handles["reranker"][0], retriever]


@pytest.mark.parametrize("layout", ["replica", "retriever", "ingress"])
def test_search_uses_the_models_a_request_names_each_with_its_own_index(layout):
    table, _ = _table(layout)
    assert [table.recall_in(m) for m, _ in table.all()] == [layout] * 3 + [None] * 2

    def search(**fields):
        request = SearchRequest.model_validate({"query": "q", "recall": {"sparse": 0}, **fields})
        return asyncio.run(table.pipeline(request).search(request))

    default = search()
    assert [h["id"] for h in default["hits"]] == ["a1", "a2"] and default["models"] == {"dense": "all-minilm-l6-v2"}
    other = search(dense_model="b")
    assert [h["id"] for h in other["hits"]] == ["b1", "b2"] and other["models"] == {"dense": "b"}
    # Co-located or in the ingress: one recall call per model, whose search time is the stand-in's.
    search_ms = {"replica": 0.5, "ingress": 0.25}
    if layout in search_ms:
        assert other["timings_ms"]["recall_dense_ms"] == search_ms[layout]
    else:  # two calls: the encoder's, then the retriever's search, timed by the pipeline
        assert other["timings_ms"]["recall_dense_ms"] not in search_ms.values()
    hybrid = search(dense_model="b", recall={"sparse": 5}, rerank=True, reranker_model="small")
    assert hybrid["models"] == {"dense": "b", "sparse": "splade-tiny", "reranker": "small"}
    assert [h["id"] for h in hybrid["hits"]] == ["b2", "b1", "a2"]  # small: shorter texts first
    longer = search(dense_model="b", recall={"sparse": 5}, rerank=True)  # the default reranker: longer first
    assert [h["id"] for h in longer["hits"]] == ["a2", "b1", "b2"]
    assert longer["models"]["reranker"] == "ms-marco-minilm-l12-v2"
    for fields, field in (
        ({"dense_model": "nope"}, "dense_model"),
        ({"dense_model": "small"}, "dense_model"),
        ({"reranker_model": "b"}, "reranker_model"),
        ({"sparse_model": "b"}, "sparse_model"),
    ):
        with pytest.raises(ApiError) as e:
            search(**fields)
        assert (e.value.status, e.value.field) == (422, field) and e.value.message.startswith(f"{field}: ")


def test_the_shipped_two_model_example_loads_and_fits_two_cpus():
    from pathlib import Path

    from raytrieve.serve.config import load_serve_config

    path = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "serve_pydocs_two_models.yaml"
    cfg = load_serve_config(str(path))
    assert [(m.name, m.index, m.default) for m in cfg.served()] == [
        ("all-minilm-l6-v2", "out/pydocs-test/index", True),
        ("minilm-tuned", "out/pydocs-test/index-tuned", False),
        ("splade-tiny", "out/pydocs-test/index", True),
        ("ms-marco-minilm-l12-v2", None, True),
        ("cross-bce", None, False),
    ]
    laptop = ClusterShape(cpus=2, largest_node_cpus=2)
    check_fits(sized(cfg, laptop), laptop)


def test_the_indices_of_an_app_must_come_from_one_corpus():
    """/search fuses and looks up ids across the indices it searches: another corpus's index is
    refused (at start, and by the replicas or retriever that hold them in an app built without
    the start's checks)."""
    from types import SimpleNamespace

    from raytrieve.inference.config import CorpusConfig
    from raytrieve.serve.deployments import one_corpus

    def index(path: str, **changes):
        corpus = CorpusConfig.model_validate({"path": path, **changes})
        return SimpleNamespace(corpus=SimpleNamespace(config=lambda: corpus))  # a source.json, parsed

    one_corpus({"/i1": index("c.parquet"), "/i2": index("c.parquet")})
    for other in (index("d.parquet"), index("c.parquet", text_column="title")):
        with pytest.raises(ConfigError, match=r"^serve.yaml: the index /i2 holds vectors of the corpus .*one corpus"):
            one_corpus({"/i1": index("c.parquet"), "/i2": other}, "serve.yaml")


def test_recall_in_ingress_needs_an_index_and_cpu_query_models():
    assert _cfg(**TWO_DENSE, recall_in_ingress=True).recall_in_ingress
    _refused(
        {"dense": {"model": "m"}, "recall_in_ingress": True},
        r"^serve.yaml.recall_in_ingress: no dense or sparse model has an index",
    )
    gpu = {**TWO_DENSE, "dense": [{**TWO_DENSE["dense"][0], "num_gpus": 1}, TWO_DENSE["dense"][1]]}
    _refused(
        {**gpu, "recall_in_ingress": True},
        r"recall_in_ingress: the ingress runs its query models on CPU, and dense\[0\] asks for a GPU",
    )


def test_the_ingress_loads_every_indexed_query_model_in_its_backend():
    keys = {**TWO_DENSE, "dense": [{**TWO_DENSE["dense"][0], "dtype": "bfloat16"}, TWO_DENSE["dense"][1]]}
    assert _cfg(**keys).ingress_models() == []
    own = _cfg(**keys, recall_in_ingress=True).ingress_models()
    assert [(m.name, m.index, m.spec.backend, m.spec.dtype) for m in own] == [
        ("all-minilm-l6-v2", "/idx/minilm", "torch", "bfloat16"),
        ("b", "/idx/b", "torch", "auto"),
        ("splade-tiny", "/idx/minilm", "torch", "auto"),
    ]
    # onnx computes in float32: an explicit bfloat16 falls back to auto there; the deployments keep theirs.
    cfg = _cfg(**keys, recall_in_ingress=True, ingress_backend="onnx")
    assert [(m.spec.backend, m.spec.dtype) for m in cfg.ingress_models()] == [("onnx", "auto")] * 3
    assert [(m.spec.backend, m.spec.dtype) for m in cfg.served()][:1] == [("torch", "bfloat16")]
    _refused(
        {**keys, "ingress_backend": "onnx"}, r"^serve.yaml.ingress_backend: has no effect without recall_in_ingress"
    )
    # The ingress holds the indices: no retriever deployment, whatever colocate_index says.
    assert _cfg(**keys, colocate_index=False).retriever_deployed
    assert not _cfg(**keys, colocate_index=False, recall_in_ingress=True).retriever_deployed


def test_served_texts_are_the_index_folders_and_a_folder_without_them_is_refused(minilm_dir, tmp_path):
    """Serve returns and reranks the texts of the index folder's documents/, the ones its vectors
    were encoded from (index build checked them against the encoding), memory-mapped: a corpus
    edited or removed after the build changes nothing served. A folder without documents/ (built
    before raytrieve kept them) is refused before Ray starts and where the index is held (a
    replica, the retriever or the ingress: an app built without the start's checks)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.errors import DataError
    from raytrieve.serve.deployments import Documents
    from raytrieve.serve.launch import check_before_start
    from tests.index_helpers import write_dense_index

    ids, texts = ["d0", "d1", "d2", "d3"], ["alpha", "beta", "gamma", "délta ✓"]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    vectors = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    index = write_dense_index(tmp_path / "index", ids, vectors,
                              {"path": str(corpus), "format": "parquet", "id_column": "id", "text_column": "text"},
                              "all-minilm-l6-v2", minilm_dir, texts=texts)
    cfg = _cfg(dense={"model": "all-minilm-l6-v2", "index": str(index)})
    check_before_start(cfg, "serve.yaml")
    documents = Documents([str(index)])
    assert documents.lookup(["d3", "d9", "d0"]) == ["délta ✓", "", "alpha"]  # "" for an id the index lacks
    hits, shown = documents.search_with_texts(str(index), "dense", vectors[2], 4, 2)
    assert hits[0][0] == "d2" and shown == {i: texts[ids.index(i)] for i, _ in hits[:2]}
    corpus.unlink()  # the corpus is not read to serve
    check_before_start(cfg, "serve.yaml")
    assert Documents([str(index)]).lookup(ids) == texts
    shutil.rmtree(index / "documents")
    message = r"index: no documents/texts\.arrow, the texts Serve returns and reranks .*rebuild it with `raytrieve index build`"
    with pytest.raises(DataError, match=r"^serve.yaml: .*" + message):
        check_before_start(cfg, "serve.yaml")
    with pytest.raises(DataError, match=message):
        Documents([str(index)])


def test_a_lookup_finds_the_texts_of_ids_only_another_folder_holds(minilm_dir, tmp_path):
    """/search looks up its fused ids' texts at one index's holder; the app's other index
    folder (one corpus, encoded at another time) may hold an id this one lacks. Its text is
    found there, not returned empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.serve.deployments import Documents
    from tests.index_helpers import write_dense_index

    corpus = tmp_path / "corpus.parquet"
    ids, texts = ["d0", "d1", "d2", "d3"], ["alpha", "beta", "gamma", "delta"]
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    entry = {"path": str(corpus), "format": "parquet", "id_column": "id", "text_column": "text"}
    vectors = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32)
    a = write_dense_index(tmp_path / "a", ids[:3], vectors[:3], entry, "all-minilm-l6-v2", minilm_dir, texts=texts[:3])
    b = write_dense_index(tmp_path / "b", ids, vectors[:4], entry, "all-minilm-l6-v2", minilm_dir, texts=texts)
    held = Documents([str(a)], others=[str(b)])
    assert held.lookup(["d3", "d0", "d9"]) == ["delta", "alpha", ""]
    assert Documents([str(a)]).lookup(["d3"]) == [""]  # the folder alone lacks it


def test_an_index_of_truncated_vectors_is_searched_with_the_query_truncated_alike(minilm_dir, tmp_path):
    """Documents encoded with dense.truncate_dim (Matryoshka) keep their first dimensions; the
    served model's query vector is full-size, and every /search was a 500 (dimension 384 against
    the index's 64). The query is cut alike: the order of a brute-force cosine over 64 dims."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.serve.deployments import Documents
    from tests.index_helpers import write_dense_index

    rng = np.random.default_rng(1)
    ids = [f"d{i}" for i in range(20)]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": [f"text {i}" for i in ids]}), corpus)
    full = rng.standard_normal((20, 384)).astype(np.float32)
    index = write_dense_index(tmp_path / "index", ids, full[:, :64], {"path": str(corpus), "format": "parquet",
                              "id_column": "id", "text_column": "text"}, "all-minilm-l6-v2", minilm_dir,
                              truncate_dim=64, texts=[f"text {i}" for i in ids])
    query = rng.standard_normal(384).astype(np.float32)
    hits = Documents([str(index)]).search(str(index), "dense", query, 5)
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    scores = cut @ (query[:64] / np.linalg.norm(query[:64]))
    order = np.argsort(-scores)[:5]
    assert [h for h, _ in hits] == [ids[i] for i in order]
    np.testing.assert_allclose([s for _, s in hits], scores[order], rtol=1e-5)


def test_int8_embeddings_are_the_unit_vector_scaled_by_127():
    """A model without a Normalize module gave vectors clipped at +-127 ([127, -38, 127, -127])."""
    from raytrieve.serve.shapes import encode_vector

    v = np.array([2.5, -0.3, 1.2, -4.0], dtype=np.float32)
    want = [round(x / float(np.sqrt((v.astype(np.float64) ** 2).sum())) * 127) for x in v.tolist()]
    assert encode_vector(v, "int8") == want == [65, -8, 31, -104]
    assert encode_vector(np.zeros(3, np.float32), "int8") == [0, 0, 0]


def test_requests_refused_before_routing_are_counted_under_their_route():
    """A 401 (no token), 413 (body too large) or 400 (unreadable Content-Length) is answered by the
    guard before FastAPI routes the request; /metrics counted them all under route "other". The
    route is the endpoint the path names; a path no endpoint has is still "other"."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from raytrieve.serve.config import LimitsConfig
    from raytrieve.serve.http_guard import SafeJSONResponse, install

    from fastapi import APIRouter

    class Counter:  # ray.serve.metrics' Counter and Histogram take tags the same way
        def inc(self, tags):
            counted.append((tags["route"], tags["status"]))

        def observe(self, value, tags):
            assert value >= 0 and set(tags) == {"route"}

    async def embeddings(body: dict) -> dict:
        return {"ok": True}

    # Routes on the app, and routes included as one router, as Serve's ingress includes them (a
    # router that matches without naming its route: every pre-routing refusal was "other" there).
    for included in (False, True):
        counted: list[tuple[str, str]] = []
        api = FastAPI(default_response_class=SafeJSONResponse)
        install(api)
        if included:
            router = APIRouter()
            router.post("/v1/embeddings")(embeddings)
            api.include_router(router)
        else:
            api.post("/v1/embeddings")(embeddings)
        api.state.ingress = type("Ingress", (), {"token": "s3cret", "limits": LimitsConfig(max_body_bytes=64),
                                                 "requests": Counter(), "latency": Counter()})()
        client = TestClient(api)
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 401
        assert client.post("/v1/embeddings", json={"input": "x" * 100}, headers=auth).status_code == 413
        assert client.post("/v1/embeddings", content=b"{}", headers={**auth, "Content-Length": "x"}).status_code == 400
        assert client.post("/v1/embeddings", json={"input": "x"}, headers=auth).status_code == 200
        assert client.get("/v1/embeddings", headers=auth).status_code == 405
        assert client.post("/v1/nothing", json={}, headers=auth).status_code == 404
        assert client.post("/v1/nothing", json={}).status_code == 401
        assert counted == [("/v1/embeddings", "401"), ("/v1/embeddings", "413"), ("/v1/embeddings", "400"),
                           ("/v1/embeddings", "200"), ("/v1/embeddings", "405"), ("other", "404"),
                           ("other", "401")], included


def test_the_error_shape_follows_the_routes_tags_and_the_body_sent():
    """A route tagged TEI alone answers every error in TEI's shape (its client shows the message),
    even refusals before the body is read; a route tagged TEI and raytrieve answers in the shape
    of the body sent (TEI's keys, \\u-escaped too); an OpenAI route in OpenAI's. The tags are read
    from the app's OpenAPI schema, so routes included as one router (Serve's way) count too."""
    import json

    from fastapi import APIRouter, FastAPI
    from pydantic import BaseModel, ConfigDict
    from starlette.testclient import TestClient

    from raytrieve.serve.config import LimitsConfig
    from raytrieve.serve.http_guard import ApiError, SafeJSONResponse, install
    from raytrieve.serve.schemas import OPENAI, RAYTRIEVE, TEI

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] | None = None
        documents: list[str] | None = None

    async def refuse(body: Body) -> dict:
        raise ApiError(422, "query", "query: missing")

    refuse.__annotations__["body"] = Body  # a local class: FastAPI cannot resolve the string annotation

    class Metric:
        def inc(self, tags):
            pass

        def observe(self, value, tags):
            pass

    def shape(response) -> str:
        body = response.json()
        if set(body) == {"error", "error_type", "field"} and isinstance(body["error"], str):
            return "tei"
        assert set(body) == {"error"} and {"type", "message", "field", "param", "code"} <= set(body["error"]), body
        return "openai"

    for included in (False, True):
        api = FastAPI(default_response_class=SafeJSONResponse)
        install(api)
        router = APIRouter() if included else api
        router.post("/embed", tags=[TEI])(refuse)
        router.post("/rerank", tags=[RAYTRIEVE, TEI])(refuse)
        router.post("/v1/embeddings", tags=[OPENAI])(refuse)
        if included:
            api.include_router(router)
        api.state.ingress = type("Ingress", (), {"token": "t", "limits": LimitsConfig(max_body_bytes=64),
                                                 "requests": Metric(), "latency": Metric()})()
        client = TestClient(api)
        auth = {"Authorization": "Bearer t"}

        def post(path, body, headers=auth):
            return client.post(path, content=body.encode(), headers={**headers, "Content-Type": "application/json"})

        # TEI's route: every refusal in TEI's shape, before the body (401, 413) or after it.
        assert [shape(post("/embed", '{"texts": ["a"]}', {})), shape(post("/embed", " " * 100)),
                shape(post("/embed", '{"texts": 5}')), shape(post("/embed", '{"documents": ["a"]}')),
                shape(post("/embed", "{"))] == ["tei"] * 5, included
        # The shared route: the body's form, from FastAPI's parse (422) or the guard's (ApiError).
        assert [shape(post("/rerank", '{"texts": 5}')), shape(post("/rerank", '{"texts": ["a"]}')),
                shape(post("/rerank", '{"\\u0074exts": ["a"]}'))] == ["tei"] * 3, included
        assert [shape(post("/rerank", '{"documents": 5}')), shape(post("/rerank", '{"documents": ["a"]}')),
                shape(post("/rerank", '{"texts": null, "documents": ["a"]}')), shape(post("/rerank", "[1]")),
                shape(post("/rerank", '{"texts": ["a"]', )), shape(post("/rerank", '{"texts": ["a"]}', {}))
                ] == ["openai"] * 6, included
        assert shape(post("/v1/embeddings", '{"texts": ["a"]}')) == "openai"
        # json.loads reads UTF-16 and UTF-32 too, where the key's bytes are not the UTF-8 ones.
        for encoding in ("utf-16", "utf-32-le"):
            assert [shape(client.post("/rerank", content=json.dumps(b).encode(encoding), headers={
                **auth, "Content-Type": "application/json"})) for b in ({"texts": ["a"]}, {"documents": ["a"]})
            ] == ["tei", "openai"], encoding
        assert post("/rerank", '{"texts": ["a"]}').json() == {"error": "query: missing", "error_type": "Validation",
                                                              "field": "query"}


def test_the_bodies_client_sdks_send_with_arguments_left_at_none_are_accepted():
    """The SDKs send an argument left at None as JSON null: LangChain's CohereRerank calls
    ClientV2.rerank(..., max_tokens_per_doc=None) and got a 422 on every call; cohere.Client's
    return_documents=None too. The bodies are the real SDKs' (caught before the network; the
    served app answers them over HTTP in test_serve.py); null is the field left out."""
    import json

    import cohere
    import httpx
    import pydantic
    from cohere.core.api_error import ApiError as CohereApiError

    from raytrieve.serve.schemas import CohereRerankV1Request, CohereRerankV2Request, SearchRequest

    sent: list[dict] = []

    def catch(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(400, json={"message": "caught"})

    client = httpx.Client(transport=httpx.MockTransport(catch))
    with pytest.raises(CohereApiError):
        cohere.ClientV2(api_key="x", base_url="http://h", httpx_client=client).rerank(
            model="m", query="q", documents=["a", "b"], top_n=None, max_tokens_per_doc=None)
    with pytest.raises(CohereApiError):
        cohere.Client(api_key="x", base_url="http://h", httpx_client=client).rerank(
            model="m", query="q", documents=["a", {"text": "b"}], top_n=None, return_documents=None,
            max_chunks_per_doc=None, rank_fields=None)
    assert sent[0]["max_tokens_per_doc"] is None and sent[1]["return_documents"] is None  # what the SDKs send
    v2, v1 = CohereRerankV2Request.model_validate(sent[0]), CohereRerankV1Request.model_validate(sent[1])
    assert v2.max_tokens_per_doc is None and v2.top_n is None and v1.return_documents is False
    # A value is still checked, and raytrieve's own bodies keep null a type error.
    with pytest.raises(pydantic.ValidationError, match="max_chunks_per_doc"):
        CohereRerankV1Request.model_validate({**sent[1], "max_chunks_per_doc": 3})
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        SearchRequest.model_validate({"query": "q", "top_k": None})


def _scaled_copy(model, to):
    """A copy of the tiny model folder ``model`` at ``to`` whose float weights are 1.5 times the
    original's: another model, registered under the same name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, to)
    weights = to / "model.safetensors"
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    return to


def test_a_registry_alias_is_pinned_to_its_version_when_the_app_is_built(registry, tiny_models, monkeypatch,
                                                                          tmp_path):
    """An alias (or ``latest``) moves: a replica starting after it moved would load another
    model than the one the app's start checked against its index. The app pins it to the
    version it names at build (``store_pins``), and replicas load that version (``load_model``
    as the deployments call it; a real MLflow registry, no Ray)."""
    import torch

    from raytrieve.encoders import load_encoder
    from raytrieve.serve.app import store_pins
    from raytrieve.serve.deployments import load_model
    from raytrieve.tracking import mlflow_run
    from raytrieve.tracking.model_uri import PIN_KEY
    from tests.conftest import SENTENCES, register_model

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])  # as the replicas' runtime_env sets it
    name = f"pinned-{tmp_path.name}"
    assert register_model(registry, tiny_models["dense"], name) == f"models:/{name}/1"
    client = mlflow_run.client(registry["uri"])
    client.set_registered_model_alias(name, "prod", "1")
    ref = f"models:/{name}@prod"
    cfg = from_dict(ServeConfig, {"dense": {"model": ref, "dtype": "float32"},
                                  "mlflow_tracking_uri": registry["uri"]})
    pins = store_pins(cfg)
    assert list(pins) == [ref] and pins[ref].startswith(f"models:/{name}/1{PIN_KEY}")
    # Another model registered and the alias moved: the app's replicas still load version 1.
    other = _scaled_copy(tiny_models["dense"], tmp_path / "other")
    assert register_model(registry, other, name) == f"models:/{name}/2"
    client.set_registered_model_alias(name, "prod", "2")
    assert store_pins(cfg)[ref].startswith(f"models:/{name}/2{PIN_KEY}")  # deployed again: the version it names now
    want = load_encoder("dense", str(tiny_models["dense"]), dtype="float32").encode(SENTENCES[:3],
                                                                                    convert_to_tensor=True)
    got = load_model("dense", cfg.dense, pins[ref]).encode(SENTENCES[:3], convert_to_tensor=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    moved = load_model("dense", cfg.dense).encode(SENTENCES[:3], convert_to_tensor=True)  # unpinned: version 2
    assert not torch.equal(moved, want)


def test_a_registry_version_registered_again_since_the_app_was_built_is_refused(registry, tiny_models,
                                                                               monkeypatch, tmp_path):
    """A version number is reused when a registry is wiped and a model registered again: a
    replica starting after that must not load the new model under the app's pin of that
    number. The pin keeps the version's run and source; the load is refused, naming the
    version, what changed and the fix, as it is while the version is gone (a real MLflow
    registry, no Ray). A pin an app of the version before took (no key) still loads."""
    from raytrieve.errors import ModelLoadError
    from raytrieve.serve.app import store_pins
    from raytrieve.serve.deployments import load_model
    from raytrieve.tracking import mlflow_run
    from raytrieve.tracking.model_uri import PIN_KEY
    from tests.conftest import SENTENCES, register_model

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    name = f"reused-{tmp_path.name}"
    ref = f"models:/{name}@prod"
    assert register_model(registry, tiny_models["dense"], name) == f"models:/{name}/1"
    client = mlflow_run.client(registry["uri"])
    client.set_registered_model_alias(name, "prod", "1")
    cfg = from_dict(ServeConfig, {"dense": {"model": ref, "dtype": "float32"}, "mlflow_tracking_uri": registry["uri"]})
    pin = store_pins(cfg)[ref]
    first = load_model("dense", cfg.dense, pin).encode(SENTENCES[:3])
    assert load_model("dense", cfg.dense, pin).encode(SENTENCES[:3]).tolist() == first.tolist()  # the pin holds
    from raytrieve import cache  # `raytrieve cache list` says what the download (named by a key) is

    assert [e.origin for e in cache.entries() if e.area == "mlflow"] == [
        f"models:/{name}/1 in the MLflow store {registry['uri']}"]
    # An app built by the version before (a pin without the key) still loads its version.
    unkeyed = pin.partition(PIN_KEY)[0]
    assert unkeyed == f"models:/{name}/1"
    assert load_model("dense", cfg.dense, unkeyed).encode(SENTENCES[:3]).tolist() == first.tolist()
    # The model deleted from the registry: refused, naming the version pinned and the fix.
    client.delete_registered_model(name)
    with pytest.raises(ModelLoadError, match=rf"the registry no longer has models:/{name}/1, .*deploy the app again"):
        load_model("dense", cfg.dense, pin)
    # Another one registered as version 1 (and aliased).
    other = _scaled_copy(tiny_models["dense"], tmp_path / "other")
    assert register_model(registry, other, name) == f"models:/{name}/1"
    client.set_registered_model_alias(name, "prod", "1")
    with pytest.raises(ModelLoadError) as refused:
        load_model("dense", cfg.dense, pin)
    message = str(refused.value)
    assert f"the registry's models:/{name}/1 is not the model this Serve app was built with" in message
    assert "registered under that version number since" in message and "deploy the app again" in message
    # Deployed again, the new pin loads the new model.
    again = load_model("dense", cfg.dense, store_pins(cfg)[ref]).encode(SENTENCES[:3])
    assert not (again == first).all()


def test_a_version_registered_again_while_it_downloads_is_not_kept(registry, tiny_models, monkeypatch, tmp_path):
    """The download resolves ``models:/NAME/N`` again after the version's run and source were
    read (they name the cache folder): a version registered again in between was kept under the
    first one's name, and served for it from then on. The version is read again after the
    download: a change refuses the load, and nothing is kept in the cache (a real MLflow
    registry, no Ray)."""
    import mlflow.artifacts

    from raytrieve import assets
    from raytrieve.errors import ModelLoadError
    from raytrieve.tracking import mlflow_run
    from raytrieve.tracking.model_uri import download_model
    from tests.conftest import register_model

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    name = f"racing-{tmp_path.name}"
    uri = register_model(registry, tiny_models["dense"], name)
    other = _scaled_copy(tiny_models["dense"], tmp_path / "other")
    real = mlflow.artifacts.download_artifacts

    def registered_again_meanwhile(*args, **kwargs):
        got = real(*args, **kwargs)
        mlflow_run.client(registry["uri"]).delete_registered_model(name)
        assert register_model(registry, other, name) == uri
        return got

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", registered_again_meanwhile)
    with pytest.raises(ModelLoadError, match=rf"the registry's {uri} changed while it downloaded .*load it again"):
        download_model(uri, registry["uri"])
    kept = assets.cache_dir() / "mlflow"
    assert not [p for p in kept.iterdir() if (p / "modules.json").exists() or (p / "config.json").exists()]
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", real)
    folder = download_model(uri, registry["uri"])  # loaded again: the version registered now
    import torch
    from safetensors.torch import load_file

    got, want = load_file(folder / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_empty_body_is_400_and_a_validators_words_come_without_pydantics_prefix():
    """An empty body got 422 "body: Field required" (README: 400 for a body that is not JSON), and
    a lone surrogate "Value error, not valid Unicode ..." (pydantic's prefix to a validator's words)."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from raytrieve.serve.config import LimitsConfig
    from raytrieve.serve.http_guard import SafeJSONResponse, install
    from raytrieve.serve.schemas import EmbeddingsRequest

    class Counter:
        def inc(self, tags):
            pass

        def observe(self, value, tags):
            pass

    api = FastAPI(default_response_class=SafeJSONResponse)
    install(api)

    async def embeddings(body: EmbeddingsRequest) -> dict:
        return {"ok": True}

    embeddings.__annotations__["body"] = EmbeddingsRequest  # a class, not the module's postponed string
    api.post("/v1/embeddings")(embeddings)
    api.state.ingress = type("Ingress", (), {"token": None, "limits": LimitsConfig(), "requests": Counter(),
                                             "latency": Counter()})()
    client = TestClient(api)
    json_type = {"content-type": "application/json"}
    empty = client.post("/v1/embeddings", content=b"", headers=json_type)
    assert empty.status_code == 400, empty.text
    assert empty.json()["error"] == {"message": "the body is empty; send a JSON object", "type": "invalid_json",
                                     "field": "body", "param": "body", "code": "invalid_json"}
    assert client.post("/v1/embeddings", content=b"").status_code == 415  # no Content-Type: that is said first
    surrogate = client.post("/v1/embeddings", content=b'{"input": "\\ud800"}', headers=json_type)
    assert surrogate.status_code == 422
    assert surrogate.json()["error"]["message"] == (
        "input: not valid Unicode (a lone surrogate at character 0); send UTF-8 text")
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
