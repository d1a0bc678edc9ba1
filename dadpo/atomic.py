"""Files that appear whole or not at all: write to a temporary name, fsync, rename.

A temporary file is named `.NAME.HOST.PID.tmp`, so a later run can tell the leftovers of a
killed writer (same host, process gone) from the file a live worker is writing right now,
possibly on another node sharing the folder.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from dadpo.errors import DadpoError

_HOST = socket.gethostname().replace(".", "_") or "host"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder (so the rename survives a power cut)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DadpoError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_json_atomic(path: Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _is_stale(tmp: Path, everything: bool) -> bool:
    if everything:
        return True
    try:
        host, pid = tmp.name[: -len(".tmp")].rsplit(".", 2)[-2:]
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
    """Remove temporary files that killed writers left under `folder`; with everything=True
    (the cache is complete, nothing is being written) remove them all. Returns the count."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file() and _is_stale(tmp, everything):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
