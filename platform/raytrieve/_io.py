"""Small file helpers shared by the library: JSON, safetensors weights, atomic directories.

Nothing already written is lost or half-written: a directory is written under a temporary
name beside its target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raytrieve.errors import DataError, ModelLoadError

if TYPE_CHECKING:  # torch is imported where weights are read or written, not by index or job code
    import torch

WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_PICKLE = "pytorch_model.bin"


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); repair or re-save the model") from None


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (``.<name>.tmp-<pid>``); once the block has
    written it, it is synced and renamed over ``target``. A crash leaves only the temporary."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_weights(module: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; contiguous clones keep tied tensors saveable.
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_SAFETENSORS))


def load_weights(module: torch.nn.Module, directory: Path) -> None:
    """Load safetensors (preferred) or a pickled state dict with ``weights_only=True``."""
    import torch
    from safetensors.torch import load_file

    st_path, bin_path = directory / WEIGHTS_SAFETENSORS, directory / WEIGHTS_PICKLE
    if st_path.exists():
        state = load_file(str(st_path))
    elif bin_path.exists():
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(
            f"{directory}: no {WEIGHTS_SAFETENSORS} or {WEIGHTS_PICKLE} for {type(module).__name__}; "
            "the module folder is incomplete, re-save the model"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{directory}: weights do not fit {type(module).__name__} "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)}); "
            "the folder's config and weights disagree"
        )


# A URI's user info (``s3://KEY:SECRET@bucket/...``, which pyarrow accepts) and the secrets a
# query may hold (Azure's client_secret, a SAS token's signature).
_USER_INFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/?#@\s:]*:[^/?#@\s]*@")
_QUERY_SECRET = re.compile(r"([?&](?:client_secret|secret_key|session_token|sas_token|account_key|sig)=)[^&#\s]*")


def redact(text: str) -> str:
    """``text`` without the keys of any URI in it: user info dropped (a location then opens with
    the credentials of the environment), secret query values as ``***``. For what a run records
    where others read it (MLflow parameters, the model card and its config, the run's stamp) and
    for messages."""
    return _QUERY_SECRET.sub(r"\1***", _USER_INFO.sub(r"\1", text))


def redact_values(value: Any) -> Any:
    """``redact`` on every string of a JSON-like value (dicts, lists)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    return value


def check_replaceable(target: str | os.PathLike, marker: str, option: str) -> None:
    """Refuse, before any work, an output folder that ``atomic_directory`` would replace but that
    is not an earlier output of the same command: a file, or a folder with other contents and
    without ``marker`` (the file that command always writes), or a URI. ``option`` names the flag."""
    from raytrieve.config import refuse_uri

    target = Path(refuse_uri(str(target), option))
    if target.exists() and not target.is_dir():
        raise DataError(f"{option} {target}: is a file; give a folder (the command writes one)")
    if target.is_dir() and not (target / marker).exists():
        held = sorted(p.name for p in target.iterdir())
        if held:
            raise DataError(
                f"{option} {target}: the folder holds other files ({', '.join(held[:5])}"
                f"{', ...' if len(held) > 5 else ''}); the command replaces its folder whole, so give a new or "
                "empty folder"
            )


# A parquet file a command writes says so in its schema metadata: a rerun may replace it, and
# nothing else is replaced (a user's file, the command's own input).
WRITTEN_BY = b"raytrieve.written_by"


def mark_written_by(table: Any, command: str) -> Any:
    """``table`` (a pyarrow Table) with ``command`` recorded in its schema metadata."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), WRITTEN_BY: command.encode()})


def check_output_file(
    target: str | os.PathLike, command: str, option: str, inputs: tuple[str | os.PathLike, ...] = ()
) -> None:
    """Refuse, before any work, a parquet output ``target`` that would replace something other
    than an earlier output of ``command``: one of the run's ``inputs``, a folder, or a file
    without the ``mark_written_by`` mark (a user's file, a file of an older version)."""
    import pyarrow.fs as pafs

    from raytrieve.config import refuse_uri
    from raytrieve.data.files import resolve

    target = Path(refuse_uri(str(target), option))
    for given in inputs:
        fs, path = resolve(str(given))  # an input may be a URI (file:// names a file here too)
        if isinstance(fs, pafs.LocalFileSystem) and target.resolve() == Path(path).resolve():
            raise DataError(f"{option} {target}: is this run's input {given}; name another file for the output")
    if not target.exists():
        return
    if target.is_dir():
        raise DataError(f"{option} {target}: is a folder; name a .parquet file")
    import pyarrow.parquet as pq

    try:
        written = (pq.read_schema(target).metadata or {}).get(WRITTEN_BY)
    except Exception:  # pyarrow raises several types for a file that is not parquet
        written = None
    if written != command.encode():
        raise DataError(
            f"{option} {target}: the file exists and is not an earlier output of {command}; name a new file, or "
            "delete it first"
        )


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o022


# In a cache entry's folder: where the entry came from, one line, for `raytrieve cache list`
# (entries are named by keys). Hidden, so no content key or model loader sees it.
ORIGIN_FILE = ".raytrieve-origin"


def write_origin(folder: Path, origin: str) -> None:
    """Record ``origin`` (a URI without its keys) in the cache entry being made in ``folder``."""
    (folder / ORIGIN_FILE).write_text(redact(origin) + "\n", encoding="utf-8")


def mark_used(folder: Path) -> Path:
    """Record that ``folder``, an entry of raytrieve's cache, was just handed out: its
    modification time set to now (``raytrieve.cache.prune`` keeps what was used lately; no file
    inside changes, so no content key sees it). A cache on a read-only or foreign file system is
    left as it is. Returns ``folder``."""
    try:
        os.utime(folder)
    except OSError:
        pass
    return folder


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder it becomes is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} already exists")
        # Swap via a second rename so a crash never leaves neither version on disk.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, target)
        except OSError as e:
            # Another process renamed its own copy into place after the exists() check above.
            if overwrite or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} already exists") from e
