"""How the demo reports and records its steps: timestamped progress with a heartbeat, and the
store that lets a second run reuse every finished step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from raytrieve.progress import periodic


class Progress:
    """Timestamped progress lines, plus a heartbeat while a long step is quiet."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.t0 = log, time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        self.log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

    @contextlib.contextmanager
    def heartbeat(
        self, what: str, status: Callable[[], str | None] | None = None, every_s: float = 20.0
    ) -> Iterator[None]:
        started = time.monotonic()

        def beat() -> None:
            try:
                detail = status() if status else None
            except Exception:  # a failing status probe drops its detail, not the heartbeat
                detail = None
            self(f"  ... {what}: {time.monotonic() - started:.0f}s" + (f", {detail}" if detail else ""))

        with periodic(every_s, beat, name="demo-heartbeat"):
            yield


class StageStore:
    """<out>/stages/<name>.json = {"key": ..., "result": ...}, written atomically when a step ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reused: list[str] = []  # steps taken from an earlier run, named in the report

    @staticmethod
    def digest(key: Any) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, name: str, key: Any, still_valid: Callable[[Any], bool] = lambda _: True) -> Any | None:
        """The recorded result when its key matches (and ``still_valid`` accepts it), else None."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("key") != self.digest(key) or not still_valid(record["result"]):
            return None
        self.reused.append(name)
        return record["result"]

    def put(self, name: str, key: Any, result: Any) -> Any:
        from raytrieve._io import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / f"{name}.json", {"key": self.digest(key), "result": result})
        return result
