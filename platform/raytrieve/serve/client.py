"""A stdlib HTTP client for the Serve app (no requests/httpx needed): what the demo, the
serve benchmark and the serve tests use to wait for the app and call it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


def _json(request: urllib.request.Request, timeout: float) -> dict[str, Any]:
    """The answer's JSON; an HTTP error status raises with the method, URL, code and body."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{request.get_method()} {request.full_url} -> {e.code}: {body}") from None


def post(url: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"}
    )
    return _json(request, timeout)


def get(url: str, timeout: float = 60.0) -> dict[str, Any]:
    return _json(urllib.request.Request(url), timeout)


def wait_healthy(base: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(1.0)
    raise TimeoutError(f"{base}/healthz did not answer 200 within {timeout_s:.0f}s ({last})")
