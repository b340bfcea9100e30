"""raytrieve's cache on a machine (raytrieve.cache, `raytrieve cache list|prune`): the entries the
real resolvers made (an object-store download, a converted variant) are listed with their size on
disk and last use; each use marks the entry; prune deletes exactly the entries unused for longer
than asked and the leftovers of killed makers older than a day, skips an entry whose lock a maker
holds, and what it deleted is made again, the same, when next resolved."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrieve import assets, cache
from raytrieve.model_ref import resolve_model

DAY = 86_400


def _age(folder: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(folder, (t, t))


def _du(folder: Path) -> int:  # an independent count: every regular file's size
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytrieve.cli", "cache", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_cache_lists_marks_and_prunes_by_last_use(tmp_path, monkeypatch, s3_store, tiny_models):
    root = tmp_path / "cache"
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(root))
    uri = s3_store.uri("cache-test/dense")
    s3_store.put(tiny_models["dense"], "cache-test/dense")
    downloaded = resolve_model(uri)
    converted = resolve_model("splade-tiny")
    assert downloaded.is_relative_to(root / "store") and converted.is_relative_to(root / "models")
    # A killed download's leftover, eight days old, and one of a download running now.
    old_tmp = root / "store" / f".{downloaded.name}.tmp-killed"
    old_tmp.mkdir()
    (old_tmp / "model.safetensors").write_bytes(b"x" * 100)
    _age(old_tmp, 8)
    new_tmp = root / "models" / ".splade-tiny-x.tmp-running"
    new_tmp.mkdir()
    _age(new_tmp, 0.5)

    found = {e.path: e for e in cache.entries()}
    assert set(found) == {downloaded, converted, old_tmp, new_tmp}
    for path, entry in found.items():
        assert entry.size == _du(path) and entry.temporary == path.name.startswith(".")
    assert found[downloaded].area == "store" and found[converted].area == "models"
    # Where a download came from is recorded (entries are named by keys), without the URI's keys;
    # a variant is named by itself.
    from tests.object_store import KEY, SECRET

    without_keys = uri.replace(f"{KEY}:{SECRET}@", "")
    assert without_keys != uri and found[downloaded].origin == without_keys and found[converted].origin is None
    assert time.time() - found[downloaded].last_used < 60

    # Resolving marks the entry used; a use older than the period makes it prunable.
    for entry in (downloaded, converted):
        _age(entry, 10)
    assert resolve_model(uri) == downloaded and resolve_model("splade-tiny") == converted
    assert time.time() - downloaded.stat().st_mtime < 60 and time.time() - converted.stat().st_mtime < 60
    _age(downloaded, 10)
    listed = _cli("list", "--json", env={"RAYTRIEVE_CACHE": str(root)})
    assert listed.returncode == 0, listed.stderr
    rows = {r["path"]: r for r in json.loads(listed.stdout)}
    assert rows[str(downloaded)]["bytes"] == _du(downloaded) and rows[str(downloaded)]["area"] == "store"
    assert rows[str(downloaded)]["origin"] == without_keys
    assert time.time() - rows[str(downloaded)]["last_used"] > 9 * DAY

    # A dry run deletes nothing; then the unused download and the old leftover go, the rest stays.
    dry = _cli("prune", "--unused-days", "7", "--dry-run", env={"RAYTRIEVE_CACHE": str(root)})
    assert dry.returncode == 0 and "would delete 2 entries" in dry.stdout, dry.stdout + dry.stderr
    assert downloaded.is_dir() and old_tmp.is_dir()
    # A maker holding the download's lock (a download of that content running now, whose
    # temporary folder the leftover may be): both skipped.
    with open(root / "store-locks" / downloaded.name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cache.prune(7 * DAY) == []
    assert downloaded.is_dir() and old_tmp.is_dir()
    pruned = _cli("prune", "--unused-days", "7", env={"RAYTRIEVE_CACHE": str(root)})
    assert pruned.returncode == 0 and "deleted 2 entries" in pruned.stdout and str(downloaded) in pruned.stdout
    assert not downloaded.exists() and not old_tmp.exists() and converted.is_dir() and new_tmp.is_dir()
    assert sorted(p.name for p in (root / "store").iterdir()) == []  # renamed away, then deleted: nothing left

    # Made again when next needed: the same files.
    again = resolve_model(uri)
    assert again == downloaded and assets.content_fingerprint(again) == assets.content_fingerprint(tiny_models["dense"])
    # A leftover is kept for a day whatever the period asked (its maker may still be writing it).
    assert new_tmp not in [e.path for e in cache.prune(0)]
    assert new_tmp.is_dir() and not converted.exists() and not again.exists()
    for period in ("-1", "nan"):  # NaN would pass every age test: the whole cache, leftovers being written too
        bad = _cli("prune", "--unused-days", period, env={"RAYTRIEVE_CACHE": str(root)})
        assert bad.returncode == 2
        assert "raytrieve cache prune: error: --unused-days must be a number, 0 or more" in bad.stderr
    assert new_tmp.is_dir()
    listed = _cli("list", env={"RAYTRIEVE_CACHE": str(root)})
    assert listed.returncode == 0 and f"{root}: 1 entry, " in listed.stdout  # not "1 entries"


def test_prune_refuses_a_period_that_is_not_a_number_0_or_more():
    for period in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="unused_for_s must be a number >= 0"):
            cache.prune(period)
