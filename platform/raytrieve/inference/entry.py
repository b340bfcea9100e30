"""What ``raytrieve encode|mine`` and ``jobs/encode.py|mine.py`` share: load the config, run,
print the result as one JSON line (errors: one line on stderr, exit status 2)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from raytrieve.errors import RaytrieveError


def _run(
    command: str,
    load: Callable[..., Any],
    run: Callable[..., Any],
    config: str,
    overrides: list[str],
    ray_address: str | None,
) -> Any | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(load(config, overrides), where=config, ray_address=ray_address)
    except RaytrieveError as e:
        print(f"raytrieve {command}: error: {e}", file=sys.stderr)
        return None


def encode_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.inference.config import load_encode_config
    from raytrieve.inference.encode import run_encode

    result = _run("encode", load_encode_config, run_encode, config, overrides, ray_address)
    if result is None:
        return 2
    if result.already_complete:
        print(
            f"{result.output_dir}: already complete ({result.rows} rows, {result.shards} shards); nothing to do",
            file=sys.stderr,
        )
    print(json.dumps(asdict(result)))
    return 0


def mine_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.inference.config import load_mine_config
    from raytrieve.inference.mine import run_mine

    result = _run("mine", load_mine_config, run_mine, config, overrides, ray_address)
    if result is None:
        return 2
    print(json.dumps(asdict(result)))
    return 0
