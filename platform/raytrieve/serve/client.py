"""A stdlib HTTP client for the Serve app (no requests/httpx needed): what the demo, the
serve benchmark and the serve tests use to wait for the app and call it.

Each call opens a connection, reads the answer and closes the connection itself, client first.
urllib asks the server to close instead ("Connection: close"), and a connection the server
closed first stays on the server's port for 60 s (Linux's TIME_WAIT): Ray binds a
direct-ingress replica's port without SO_REUSEADDR, so a replica restarting after a crash waited
out every such connection of the last minute (measured: the app's readiness polls held its port
a minute after it started)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any


def _call(method: str, url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """(status, body) of one request over a connection of its own, closed here first."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8100)")
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    # The host and port as written: http.client reads "[::1]:8100" and Serve's "::1:8100" alike.
    conn = connection(parts.netloc.rpartition("@")[2], timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body, {"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _json(method: str, url: str, body: bytes | None, timeout: float) -> dict[str, Any]:
    """The answer's JSON; an HTTP error status raises with the method, URL, code and body."""
    status, answer = _call(method, url, body, timeout)
    if status >= 400:
        raise RuntimeError(f"{method} {url} -> {status}: {answer.decode(errors='replace')[:500]}")
    return json.loads(answer)


def post(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    return _json("POST", url, json.dumps(body).encode(), timeout)


def get(url: str, timeout: float = 60.0) -> dict[str, Any]:
    return _json("GET", url, None, timeout)


def wait_healthy(base: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            status, answer = _call("GET", f"{base}/healthz", None, timeout=5)
            if status == 200:
                return
            last = f"{status}: {answer.decode(errors='replace')[:200]}"
        except (http.client.HTTPException, OSError) as e:
            last = str(e) or type(e).__name__
        time.sleep(1.0)
    raise TimeoutError(f"{base}/healthz did not answer 200 within {timeout_s:.0f}s ({last})")
