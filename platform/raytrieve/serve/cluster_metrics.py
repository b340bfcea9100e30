"""Request metrics of the HTTP ingress, counted across all its replicas.

Each ingress replica records requests and latency by route into Ray Serve's metrics
(``ray.serve.metrics``), which Ray exports, tagged with the replica, from the metrics agent of
the replica's node (the node's ``metrics_export_port``, Prometheus text), as
``ray_raytrieve_requests_total`` and ``ray_raytrieve_request_seconds``. A per-replica registry
would answer for whichever replica the proxy picked; these series cover every replica.

``GET /metrics`` reads those series from every alive node's agent and answers them as one
Prometheus page, so a single scrape target sees the whole app. Prometheus that already scrapes
Ray's agents (Ray's service discovery file, KubeRay's monitors) has the same series there:
scrape one or the other, not both, or requests are counted twice. Ray sends a replica's values
to its agent every few seconds, so a request shows up after that delay.
"""

from __future__ import annotations

import urllib.request
from typing import Any

# Series names as Ray exports them (it prefixes "ray_").
PREFIX = "ray_raytrieve_"
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


def request_metrics() -> tuple[Any, Any]:
    """(requests Counter by route and status, latency Histogram by route); made in each ingress
    replica, where Serve adds the deployment, replica and application tags."""
    from ray.serve.metrics import Counter, Histogram

    # Ray types tag_keys as a one-element tuple; any tuple of names works.
    requests = Counter(
        "raytrieve_requests",
        description="HTTP requests by route and status",
        tag_keys=("route", "status"),  # pyright: ignore[reportArgumentType]
    )
    latency = Histogram(
        "raytrieve_request_seconds",
        description="HTTP request latency by route",
        boundaries=LATENCY_BOUNDARIES,
        tag_keys=("route",),
    )
    return requests, latency


def agent_urls() -> list[str]:
    """The metrics page of every alive node's Ray metrics agent."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def gather(urls: list[str], timeout_s: float = 5.0) -> tuple[str, list[str]]:
    """(one Prometheus text page of the raytrieve series from all ``urls``, the urls that did
    not answer). Blocking: the ingress runs it in a thread."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    failed = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                text = response.read().decode()
        except OSError:
            failed.append(url)
            continue
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(PREFIX):
                continue
            if family.name in families:  # the same series name on another node: one family
                families[family.name].samples.extend(family.samples)
            else:
                families[family.name] = family
    return _render(list(families.values())), failed


def _render(families: list[Any]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class Merged:
        def collect(self) -> list[Any]:
            return families

    # A registry only to write the exposition format; it holds no values of its own.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())  # pyright: ignore[reportArgumentType]
    return generate_latest(registry).decode()
