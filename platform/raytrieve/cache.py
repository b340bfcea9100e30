"""raytrieve's cache on this machine (``$RAYTRIEVE_CACHE``, default ``~/.cache/raytrieve``): what
it holds, and pruning what has not been used for a while (``raytrieve cache list|prune``).

Every entry can be made again from where it came from: a folder downloaded from an object store
or an MLflow store, a model a job's driver shipped to this machine, a shipped variant converted
on first use, an ONNX export, a starting model a training run built. Nothing evicts entries by
itself: a node that serves or encodes with many models over months keeps one copy of each.

Last use: whoever hands an entry out (``model_ref``, ``files.fetch_folder``, the MLflow
download, the ONNX export, a training run's starting model) calls ``raytrieve._io.mark_used``,
which sets the entry folder's modification time to now; no file inside changes, so no content
key or fingerprint sees it. ``prune`` deletes the entries unused for longer than asked, and the
temporary folders a killed download or unpacking left behind once they are a day old too. Each
entry is first renamed away, then deleted: a process that resolves it meanwhile makes it again
rather than finding half a folder. An entry whose lock is held (one being downloaded or unpacked
right now) is skipped. A process that resolved an entry before the prune and loads it after
finds it gone: prune with a period longer than any job or replica start.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raytrieve._io import ORIGIN_FILE
from raytrieve.assets import cache_dir

# Each area of the cache: the folder under $RAYTRIEVE_CACHE, what it holds.
AREAS = {
    "store": "model and index folders downloaded from object stores (s3://, gs://, abfs://)",
    "mlflow": "models downloaded from an MLflow store (models:/, runs:/)",
    "shipped": "model folders a job's driver shipped to this machine",
    "models": "shipped variants converted on first use",
    "onnx": "ONNX exports of models served or encoded with backend: onnx",
    "initial-models": "starting models training runs built (inference-free SPLADE) for output in an object store",
}
# The areas whose makers hold a lock per entry while they make it: ``<area>-locks/<entry name>``.
LOCKED_AREAS = ("store", "shipped")
DAY_S = 86_400


@dataclass(frozen=True)
class Entry:
    area: str
    path: Path
    size: int  # bytes of its files
    last_used: float  # the folder's modification time (``mark_used``), seconds since the epoch
    temporary: bool  # a killed maker's leftover (``.NAME.tmp-*``, ``.NAME.old-*``, a prune's ``.NAME.pruned-*``)
    origin: str | None = None  # where it came from (``_io.write_origin``): a URI; None where unrecorded


def _origin(folder: Path) -> str | None:
    try:
        return (folder / ORIGIN_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile
                pass
    return total


def entries(root: Path | None = None) -> Iterator[Entry]:
    """Every entry of the cache at ``root`` (default: this machine's), area by area, by name."""
    root = Path(root) if root is not None else cache_dir()
    for area in AREAS:
        folder = root / area
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_dir():
                continue
            temporary = path.name.startswith(".")
            try:
                used = path.stat().st_mtime
            except OSError:
                continue
            yield Entry(area, path, _size(path), used, temporary, _origin(path))


def prune(unused_for_s: float, root: Path | None = None, dry_run: bool = False) -> list[Entry]:
    """Delete the entries (and leftovers) of the cache at ``root`` not used for ``unused_for_s``
    seconds; returns them. ``dry_run``: delete nothing, return what would go."""
    if not math.isfinite(unused_for_s) or unused_for_s < 0:  # NaN would pass every age test below
        raise ValueError(f"unused_for_s must be a number >= 0, not {unused_for_s}")
    root = Path(root) if root is not None else cache_dir()
    now = time.time()
    gone = []
    for entry in entries(root):
        # A leftover is at least a day old too: a maker writing one now (its lock held where its
        # area has locks; in the others this is all that keeps it) keeps touching it.
        cutoff = now - (max(unused_for_s, DAY_S) if entry.temporary else unused_for_s)
        if entry.last_used > cutoff:
            continue
        if dry_run:  # locks are not looked at: a real prune may skip some of these
            gone.append(entry)
        elif _delete(root, entry, cutoff):
            gone.append(entry)
    return gone


def _delete(root: Path, entry: Entry, cutoff: float) -> bool:
    """Rename ``entry`` away under its lock (where its area has locks), then delete it. False when
    it is being made (its lock held), was used since it was listed (its time after ``cutoff``),
    went meanwhile or cannot be renamed."""
    # A leftover's lock is its entry's: ".KEY.tmp-*" -> KEY.
    key = entry.path.name
    if entry.temporary:
        key = key[1:].split(".tmp-")[0].split(".old-")[0].split(".pruned-")[0]
    lock_path = root / f"{entry.area}-locks" / key
    lock = None
    if entry.area in LOCKED_AREAS and lock_path.exists():
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return False
    try:
        away = entry.path.with_name(f".{entry.path.name.lstrip('.')}.pruned-{os.getpid()}")
        try:
            if entry.path.stat().st_mtime > cutoff:  # handed out since it was listed
                return False
            os.replace(entry.path, away)
            if away.stat().st_mtime > cutoff:  # handed out between the check and the rename
                os.replace(away, entry.path)
                return False
        except OSError:  # gone meanwhile, or not ours to rename
            return False
        shutil.rmtree(away, ignore_errors=True)
        return True  # the lock file stays: a maker waiting on it holds that file, not a new one
    finally:
        if lock is not None:
            lock.close()
