"""Where a file lives: a local path or any URI pyarrow resolves (``s3://``, ``gs://``,
``abfs://``, ``file://``), as a (filesystem, path) pair; byte reads used by the line
formats; arrow files opened by record batch; ``OutputStore``, a folder written on any of them
(the encoding job's output, training's checkpoint folder). Shared by the source planner
(sources.py), the input formats (formats.py) and the jobs that write.
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob as globlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.fs as pafs

from raytrieve._io import atomic_directory, mark_used, redact, write_origin
from raytrieve.errors import DataError

GLOB_CHARS = "*?["
STREAM_BUFFER = 8 << 20  # bytes per read of a remote arrow file (files.open_arrow)


def is_uri(location: str) -> bool:
    return "://" in location


def is_glob(path: str) -> bool:
    return any(ch in path for ch in GLOB_CHARS)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise DataError(
                f"{redact(location)}: pyarrow cannot open this URI ({redact(str(e))}); check the scheme and credentials"
            ) from None
        return fs, path
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def glob_files(fs: pafs.FileSystem, path: str) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        return sorted(globlib.glob(path))
    base = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)].rsplit("/", 1)[0]
    selector = pafs.FileSelector(base, recursive=True)
    return sorted(i.path for i in fs.get_file_info(selector) if fnmatch.fnmatch(i.path, path))


def file_uri_path(location: str) -> str:
    """``location`` with a ``file://`` URI turned into the local path it names (a local folder
    then gets local disk's checks and atomic renames); any other location as given."""
    if is_uri(location):
        fs, root = resolve(location)
        if isinstance(fs, pafs.LocalFileSystem):
            return root
    return location


def folder_with_suffix(location: str, suffix: str = "") -> str:
    """The folder ``location`` without a trailing slash, ``suffix`` added to its last name; a
    URI's query (its store's options) stays at its end: ``s3://b/m/?region=x`` and ".checkpoints"
    give ``s3://b/m.checkpoints?region=x``."""
    base, mark, query = location.partition("?") if is_uri(location) else (location, "", "")
    return f"{base.rstrip('/')}{suffix}{mark}{query}"


def with_scheme(location: str, root: str, path: str) -> str:
    """``path``, a file under ``location`` (a folder or glob; ``root``: its path inside its
    filesystem, as ``resolve`` gives it) inside that filesystem, as a location
    that ``resolve`` opens again anywhere. A URI's file keeps what the filesystem's paths leave
    out: the authority (abfs's ``account.dfs.core.windows.net``) and the query
    (``?endpoint_override=...``)."""
    if not is_uri(location):
        return path
    base, mark, query = location.partition("?")
    while base.endswith("/") and not base.endswith("://"):
        base = base[:-1]
    # The URI ends with the part of its filesystem path below the folder or the glob's fixed
    # start (percent-encoded there; pyarrow decodes it): the file's path below it goes there,
    # encoded, so a name holding "%", "#" or a space opens as itself.
    # Wildcards count in the path only: a host may hold "[" (IPv6), a password "*".
    start = base.index("://") + 3
    end = base.find("/", start) if "/" in base[start:] else len(base)
    base = base[:end] + _fixed_part(base[end:], location)
    root = _fixed_part(root.rstrip("/"), location)
    below = root[root.find("/") + 1 :] if "/" in root else ""
    if not path.startswith(root) or not unquote(base).endswith(below):
        raise DataError(f"{redact(location)}: cannot name its file {path} by a URI; name the file itself")
    return f"{base}{quote(path[len(root) :], safe='/')}{mark}{query}"


def _fixed_part(location: str, given: str) -> str:
    """A glob's folder before its first wildcard; anything else as it is."""
    if not is_glob(location):
        return location
    cut = location.rfind("/", 0, min(location.index(ch) for ch in GLOB_CHARS if ch in location))
    if cut < 0:
        raise DataError(f"{redact(given)}: a wildcard in the bucket; name it, and put wildcards in the path only")
    return location[:cut]


def read_bytes(fs: pafs.FileSystem, path: str, start: int, length: int) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read_at(length, start) if length > 0 else b""


def next_line_start(f: Any, start: int, stop: int | None = None) -> int | None:
    """The first byte of the first line that starts at or after ``start`` in the open file ``f``:
    a line starts at a byte only if the byte before it ends a line. None when no line starts
    before ``stop`` (the end of the file by default). The one rule that splits a text file into
    ranges (``lines_in_range``) and finds a range's line again (``formats.bad_line``)."""
    if start == 0:
        return 0
    end = stop if stop is not None else float("inf")
    offset = start - 1
    f.seek(offset)
    while offset < end:
        chunk = f.read(1 << 16)
        if not chunk:
            break
        cut = chunk.find(b"\n")
        if cut >= 0:
            begin = offset + cut + 1
            return begin if begin < end else None
        offset += len(chunk)
    return offset if stop is None else None


def lines_in_range(fs: pafs.FileSystem, path: str, start: int, stop: int) -> bytes:
    """The lines that start in ``[start, stop)``, whole (the last may run past ``stop``)."""
    with fs.open_input_file(path) as f:
        size = f.size()
        begin = next_line_start(f, start, stop)
        if begin is None:
            return b""
        f.seek(begin)
        body = f.read(stop - begin)
        tail = []
        if body and not body.endswith(b"\n") and stop < size:
            while True:  # finish the line that crosses ``stop``
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                cut = chunk.find(b"\n")
                if cut >= 0:
                    tail.append(chunk[: cut + 1])
                    break
                tail.append(chunk)
        return body + b"".join(tail)


class open_arrow:  # lower case: read as a function, ``with open_arrow(fs, path) as batches:``
    """The record batches of an HF ``datasets`` arrow file (IPC stream, or file format)."""

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        # A local file is memory-mapped (a batch's body is paged in only when read); a remote
        # one is read as a buffered stream: record batches read one by one with random access
        # cost a ranged request each (datasets writes batches of 1,000 rows).
        local = isinstance(fs, pafs.LocalFileSystem)
        self.source = pa.memory_map(path) if local else fs.open_input_stream(path, buffer_size=STREAM_BUFFER)

    def __enter__(self) -> Any:  # a RecordBatchStreamReader, or a generator of record batches
        try:
            return pa.ipc.open_stream(self.source)
        except pa.ArrowInvalid:  # the IPC file format: its footer needs random access
            if isinstance(self.source, pa.MemoryMappedFile):
                self.source.seek(0)
            else:
                self.source.close()
                self.source = self.fs.open_input_file(self.path)
            reader = pa.ipc.open_file(self.source)
            return (reader.get_batch(i) for i in range(reader.num_record_batches))

    def __exit__(self, *exc: object) -> None:
        self.source.close()


TMP_MARK = ".tmp-"  # in the name of a file being written (local disk: written, then renamed)
# In a folder replaced file by file on an object store (``OutputStore.replace_with``), from the
# first change to the last: its readers (model_ref.store_model) refuse the folder meanwhile.
INCOMPLETE = ".incomplete"


@dataclass
class OutputStore:
    """A folder of the job's output on some filesystem (picklable: it travels to workers)."""

    location: str

    def __post_init__(self) -> None:
        self.fs, self.root = resolve(self.location)
        # Local and mounted storage can rename; object stores cannot, but a put is atomic.
        self.renames = isinstance(self.fs, pafs.LocalFileSystem)

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.location = state["location"]
        self.__post_init__()

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def describe(self, name: str = "") -> str:
        """For messages: the location without the keys a URI may hold (_io.redact)."""
        return redact(f"{self.location.rstrip('/')}/{name}" if name else self.location)

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name) if name else self.root).type != pafs.FileType.NotFound

    def is_folder(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def names(self) -> list[str]:
        if not self.exists():
            return []
        return sorted(Path(i.path).name for i in self.fs.get_file_info(pafs.FileSelector(self.root)))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except FileNotFoundError:
            raise DataError(f"{self.describe(name)}: not found") from None
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
            raise DataError(f"{self.describe(name)}: not valid JSON ({e}); delete it and run the job again") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """All of ``data`` at ``name`` or nothing: temporary name + rename, or one put."""
        self.fs.create_dir(self.root, recursive=True)
        if not self.renames:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        tmp = self.path(f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode())

    def delete(self, name: str) -> None:
        """A file or a folder (a staged input), gone; nothing when it is not there."""
        kind = self.fs.get_file_info(self.path(name)).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(name))
        elif kind != pafs.FileType.NotFound:
            self.fs.delete_file(self.path(name))

    def check_replaceable(self, marker: str, what: str) -> None:
        """Refuse, before any work, a folder that ``replace_with`` would replace but that is no
        earlier output of the same kind (``marker``: the file such a folder always holds; one
        cut short holds ``INCOMPLETE``): a file, a folder with other files, a bucket itself.
        ``what`` (a config key or flag) begins the message."""
        shown = f"{what} {self.describe()}"
        if self.renames:  # a file:// URI: local disk's rules
            from raytrieve._io import check_replaceable

            check_replaceable(self.root, marker, what)
            return
        if "/" not in self.root.strip("/"):
            raise DataError(f"{shown}: a bucket (or container) itself; name a folder inside it")
        if self.exists() and not self.is_folder():
            raise DataError(f"{shown}: is a file; give a folder (what is written is one)")
        names = self.names()
        held = [n for n in names if n != INCOMPLETE]
        if held and marker not in held and INCOMPLETE not in names:
            raise DataError(
                f"{shown}: the folder holds other files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                "it is replaced whole, so name a new folder or an earlier output's"
            )

    def replace_with(self, local: Path) -> None:
        """The folder becomes a copy of the local folder ``local``, on a store that cannot rename
        a folder (local disk: ``_io.atomic_directory``). ``INCOMPLETE`` is put first and deleted
        last, so a reader never takes a folder half old and half new for either, and a write that
        was killed is seen as one; each file is one put."""
        self.write_bytes(INCOMPLETE, b"")
        for name in self.names():
            if name != INCOMPLETE:
                self.delete(name)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            name = file.relative_to(local).as_posix()
            if self.renames:  # a local folder needs its parents; an object store has none (nor a right to make them)
                self.fs.create_dir(self.path(name).rsplit("/", 1)[0], recursive=True)
            with open(file, "rb") as src, self.fs.open_output_stream(self.path(name)) as out:
                while chunk := src.read(STREAM_BUFFER):
                    out.write(chunk)
        self.delete(INCOMPLETE)

    def remove_temporaries(self) -> int:
        """Leftovers of a killed run (never trusted, never needed)."""
        stale = [n for n in self.names() if n.startswith(".") and TMP_MARK in n]
        for n in stale:
            self.delete(n)
        return len(stale)


STORE_FIX = (
    "check the URI, and that this machine has the store's credentials (for S3: AWS_* variables or the instance's "
    "role; the driver and every node that reads it need them)"
)


@dataclass
class _Listed:
    """A store folder as ``fetch_folder`` lists it: its files, their state and the copy's key."""

    fs: Any
    files: dict[str, pafs.FileInfo]
    state: list[tuple[str, int | None, int | None]]
    key: str


def _list_folder(uri: str, what: str, markers: tuple[str, ...], expect: str) -> tuple[_Listed, Any]:
    """The folder at ``uri`` listed and checked (no write under way, one of ``markers`` at its
    top, no name outside it); with a function that lists it again."""
    shown = redact(uri)
    fs, root = resolve(uri)
    root = root.rstrip("/")

    def listing() -> dict[str, pafs.FileInfo]:
        try:
            listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        except OSError as e:
            raise DataError(f"{what} {shown}: cannot list the folder ({redact(str(e))}); {STORE_FIX}") from None
        out = {}
        for i in listed:
            if i.type != pafs.FileType.File or TMP_MARK in i.base_name:  # folders; a write's leftovers
                continue
            if not i.path.startswith(f"{root}/"):
                raise DataError(f"{what} {shown}: the store listed {i.path}, not below {root}; name the folder itself")
            out[i.path[len(root) + 1 :]] = i
        return out

    files = listing()
    if INCOMPLETE in files:  # OutputStore.replace_with: a write under way, or cut short
        raise DataError(
            f"{what} {shown}: is being written, or its write was cut short ({INCOMPLETE} is there); wait for the "
            "job that writes it to end, or rerun it"
        )
    if not any(m in files for m in markers):
        found = "nothing is there" if not files else f"no {' and no '.join(markers)} at its top"
        raise DataError(f"{what} {shown}: {found}; point at {expect}, or {STORE_FIX}")
    for name in files:
        if name.startswith("/") or ".." in name.split("/"):
            raise DataError(f"{what} {shown}: holds {name!r}, a name that would land outside the folder")
    state = _state(files)
    base, mark, query = shown.partition("?")  # s3://b/idx and s3://b/idx/ are one folder
    key = hashlib.sha256(json.dumps([base.rstrip("/") + mark + query, state]).encode()).hexdigest()[:16]
    return _Listed(fs, files, state, key), listing


def _state(files: dict[str, pafs.FileInfo]) -> list[tuple[str, int | None, int | None]]:
    return sorted((name, i.size, i.mtime_ns) for name, i in files.items())


def folder_key(uri: str, what: str, markers: tuple[str, ...], expect: str) -> str:
    """The key ``fetch_folder`` gives the folder at ``uri`` as it is now, without downloading it:
    what a Serve app pins its index URIs to when it is built."""
    return _list_folder(uri, what, markers, expect)[0].key


def fetch_folder(
    uri: str, cache: Path, what: str, markers: tuple[str, ...], expect: str, pin: str | None = None
) -> Path:
    """A local copy of the folder at ``uri`` (a model, an index), downloaded into ``cache/<key>``
    once per content: the key holds the URI without its keys and each file's name, size and
    modification time, so a folder written again at the same URI is downloaded again, a copy in
    use is never changed, and a download that fails or finds a file changed midway leaves
    nothing. ``markers``: files one of which a folder of its kind holds at its top; ``expect``:
    what the URI should name. ``pin``: the key of the one content wanted (``folder_key``, when a
    Serve app was built): this machine's copy of it, or the folder while it still holds it; the
    folder written again since is refused. Raises DataError "``what`` ``uri``: ..." (no keys)."""
    shown = redact(uri)

    def complete(target: Path) -> bool:
        return any((target / m).is_file() for m in markers)

    if pin is not None and complete(cache / pin):  # a copy never changes: no need to list the store
        return mark_used(cache / pin)
    listed, listing = _list_folder(uri, what, markers, expect)
    if pin is not None and listed.key != pin:
        raise DataError(
            f"{what} {shown}: written again since the app pinned its content (when it was deployed), and this "
            "machine has no copy of that content; deploy the app again to serve the new one (every replica then "
            "takes it), or build into a new URI and point the app there"
        )
    target = cache / listed.key
    if complete(target):
        return mark_used(target)
    locks = cache.with_name(f"{cache.name}-locks")  # beside the copies (as model_ref's shipped-locks)
    locks.mkdir(parents=True, exist_ok=True)
    # One process of this machine downloads (a node's Serve replicas start together); the others
    # wait for it, then find the copy.
    with open(locks / listed.key, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(target):
            return mark_used(target)
        for stale in cache.glob(f".{listed.key}.tmp-*"):  # a killed download's (the lock holder alone writes one)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            with atomic_directory(target, overwrite=False) as tmp:
                for name, _, _ in listed.state:
                    dest = tmp / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with listed.fs.open_input_stream(listed.files[name].path) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, STREAM_BUFFER)
                write_origin(tmp, uri)
                # A write that began after the listing (same sizes, other bytes) shows in a new one.
                if _state(listing()) != listed.state:
                    raise DataError(f"{what} {shown}: it changed while it was downloaded; read it again")
        except OSError as e:  # FileExistsError too: a name that is a file and a folder in the store
            if isinstance(e, FileExistsError) and complete(target):  # made meanwhile by a machine sharing the cache
                return mark_used(target)
            raise DataError(f"{what} {shown}: the download failed ({redact(str(e))}); {STORE_FIX}") from None
    return target
