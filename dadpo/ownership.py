"""What dadpo may clear: only what it made, and never what the same command reads.

Before a command removes anything from an output (train, sft and sweep --out; cache-teacher,
generate and eval --overwrite) it calls ensure_owned. A missing or empty folder is dadpo's to fill;
a non-empty one (hidden entries such as .lock and temporary files aside) is dadpo's only when it
holds the command's marker file (train_config.json, sweep.json, manifest.json, ...) and the marker
reads as dadpo's. A file output (generate's OUT) is dadpo's when its marker (its own metadata, or
its sidecar) reads as dadpo's. And nothing to be removed may be, or hold, a path the command reads
(the --model folder, the cache, the pairs): training into --out DIR from --model DIR/model would
otherwise delete the model it is about to train. A refusal is one line naming the folder and the
flag, and is raised before anything is changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from dadpo.errors import DadpoError, first_line

PathLike = str | os.PathLike


def ensure_owned(target: PathLike, *, flag: str, what: str, marker: str,
                 parse: Callable[[Path], object] | None = None, removes: Iterable[PathLike] = (),
                 protected: Mapping[str, PathLike | None] | Iterable[tuple[str, PathLike | None]] = ()) -> None:
    """Refuse (DadpoError, one line) to clear `target` unless dadpo made it.

    target     the output: a folder, or a file (generate's OUT); it may not exist yet
    flag, what how the message names it: "--out", "a dadpo training run"
    marker     the file that says dadpo made it, by name: inside a folder target, beside a file target
               (it may be the file target itself, e.g. a Parquet file whose metadata is the marker)
    parse      parse(marker path) -> anything but None when the marker is dadpo's; None, OSError,
               ValueError or DadpoError when it is not (None: the marker only has to exist)
    removes    what the command will remove, by name relative to the marker's folder (or absolute)
    protected  what the command reads, {label: path} or (label, path) pairs (label e.g. "--model");
               None and paths that do not exist (a hub id) are skipped
    """
    target = Path(target)
    folder = target if target.is_dir() or not target.exists() else target.parent
    if target.exists():
        _check_marker(target, folder / marker, flag, what, parse)
    _check_protected(target, [folder / name for name in removes], protected, flag)


def _check_marker(target: Path, marker: Path, flag: str, what: str, parse) -> None:
    if target.is_dir():
        visible = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if not p.name.startswith("."))
        if not visible:
            return  # empty (dadpo's own hidden bookkeeping aside): nothing of anyone's to lose
        if not marker.is_file():
            listed = visible if len(visible) <= 3 else visible[:3] + [f"{len(visible) - 3} more"]
            held = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
            raise DadpoError(f"{flag} {target}: holds {held} but no {marker.name}, so it is not {what}; dadpo changes "
                             f"nothing there: choose another {flag} (a new or empty folder)")
    elif not marker.is_file():
        raise DadpoError(f"{flag} {target}: exists but has no {marker.name}, so it is not {what}; dadpo changes "
                         f"nothing there: choose another {flag}")
    if parse is None:
        return
    try:
        value, reason = parse(marker), "it is not what dadpo writes there"
    except DadpoError as exc:
        value, reason = None, str(exc)
    except (OSError, ValueError) as exc:
        value, reason = None, first_line(exc)
    if value is None:
        named = "it" if marker == target else f"its {marker.name}"
        raise DadpoError(f"{flag} {target}: {named} does not read as dadpo's ({reason}), so it is not {what}; dadpo "
                         f"changes nothing there: choose another {flag}, or remove it yourself if it is yours")


def _check_protected(target: Path, removes: list[Path], protected, flag: str) -> None:
    items = protected.items() if isinstance(protected, Mapping) else protected
    # a path that is not there (a hub id) cannot be lost
    reads = [(label, Path(os.path.realpath(path))) for label, path in items if path and Path(path).exists()]
    for removed in removes:
        gone = Path(os.path.realpath(removed))
        for label, path in reads:
            if path == gone or gone in path.parents:
                raise DadpoError(f"{flag} {target}: this run would remove {gone}, which holds {label} {path}; "
                                 f"choose another {flag} (or copy {path} elsewhere first)")


def read_json_object(path: PathLike, what: str) -> dict:
    """A JSON object from `path`; DadpoError naming the file for anything else (missing, torn, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DadpoError(f"{path}: no such file ({what})") from None
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{path}: unreadable {what} ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise DadpoError(f"{path}: not a {what} (expected a JSON object)")
    return value
