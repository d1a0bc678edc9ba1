"""The one way dadpo writes an output: whole or not at all.

Every file (shards, manifests, summaries, reports, PNGs, generate outputs, checkpoint pieces) is
written to a temporary name beside its target, fsynced, renamed over it, and the folder fsynced, so
a crash, a kill -9 or a full disk leaves either the old file or the new one, never half of one.
Folders (models, checkpoints) are filled under a temporary name and renamed the same way.

A temporary name is `.NAME.HOST.PID.tmp`, so a later run can tell the leftovers of a killed writer
(same host, process gone) from a file a live worker is writing right now, possibly on another node.
A full disk (ENOSPC) or an exhausted quota (EDQUOT) becomes one line naming the file, the space it
needed and the space that was free.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

from dadpo.errors import DadpoError

_HOST = socket.gethostname().replace(".", "_") or "host"
_SPACE_ERRORS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for item in [root, *root.rglob("*")]:
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        elif item.is_dir():
            _fsync_dir(item)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def out_of_space(exc: BaseException) -> bool:
    """A full disk or quota, also as libraries report it (safetensors, arrow: the OS text, not an OSError)."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRORS:
        return True
    text = str(exc)
    return any(sign in text for sign in ("No space left on device", "os error 28", "Disk quota exceeded",
                                         "os error 122"))


def write_error(path: Path, exc: BaseException, needed_bytes: int | None = None) -> DadpoError:
    """A failed write of `path` as one line; a full disk says how much was needed and free."""
    if out_of_space(exc):
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = None
        need = f"about {_size_text(needed_bytes)} needed, " if needed_bytes else ""
        have = f"{_size_text(free)} free" if free is not None else "free space unknown"
        quota = "quota" in str(exc).lower() or "122" in str(exc) or getattr(exc, "errno", None) == getattr(errno, "EDQUOT", 0)
        kind = "disk quota exceeded" if quota else "no space left on the device"
        return DadpoError(f"{path}: {kind} ({need}{have}); nothing was published under that name: free space and "
                          "re-run the same command to continue")
    return DadpoError(f"{path}: cannot write ({getattr(exc, 'strerror', None) or exc})")


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def write_atomic(path: Path, write: Callable[[Path], None], needed_bytes: int | None = None) -> Path:
    """write(tmp) fills a temporary file; it then replaces `path` in one rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        written = _size(tmp)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # its folder could not be made (a file is in the way): there is no temporary file
        if isinstance(exc, OSError) or out_of_space(exc):
            raise write_error(path, exc, needed_bytes or written or None) from None
        raise
    return path


def write_folder_atomic(path: Path, write: Callable[[Path], None], needed_bytes: int | None = None) -> Path:
    """write(tmp_folder) fills a temporary folder; it then replaces the folder `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.old.tmp")
        if path.exists():
            os.replace(path, old)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or out_of_space(exc):
            raise write_error(path, exc, needed_bytes or written or None) from None
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), len(text.encode("utf-8")))


def write_json_atomic(path: Path, payload) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def write_parquet_atomic(table, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write an Arrow table as zstd Parquet; return the file's sha256."""
    import pyarrow.parquet as pq

    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), table.nbytes)
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_stale(tmp: Path, everything: bool) -> bool:
    if everything:
        return True
    try:
        host, pid = tmp.name.removesuffix(".tmp").removesuffix(".old").rsplit(".", 2)[-2:]
        pid = int(pid)
    except ValueError:
        return False  # not one of ours
    if host != _HOST:
        return False  # maybe a live worker on another node: left for the run that completes the cache
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False  # alive: a worker writing right now


def sweep_temp_files(folder: Path, everything: bool = False) -> int:
    """Remove temporary files and folders that killed writers left under `folder`; with
    everything=True (nothing is being written) remove them all. Returns the count."""
    removed = 0
    for tmp in sorted(Path(folder).rglob(".*.tmp"), key=lambda p: -len(p.parts)):
        if tmp.exists() and _is_stale(tmp, everything):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed += 1
    return removed
