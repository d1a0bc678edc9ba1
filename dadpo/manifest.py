"""The cache manifest (data_specs/cache.v1.md): what produced the numbers, and which shards exist.

manifest.json is only ever replaced whole (write to a temporary name, fsync, rename), under an
advisory lock on CACHE/.lock, so any number of uncoordinated workers can record their shards
into one folder and a reader never sees a half-written manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from dadpo import __version__
from dadpo.errors import DadpoError
from dadpo.specs import validate_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DROPPED_NAME = "dropped_ids.txt"

# What must match for cached numbers to be comparable: (key path, label for the message).
GUARDED = [
    (("schema_version",), "schema version"),
    (("pairs", "fingerprint"), "pairs fingerprint"),
    (("pairs", "rows"), "number of pairs"),
    (("shard_size",), "shard size"),
    (("length_rule", "max_length"), "max length"),
    (("length_rule", "on_overlong"), "on-overlong rule"),
    (("tokenization_rule",), "tokenization rule version"),
]
for _role in ("teacher", "reference"):
    GUARDED += [
        ((_role, "model"), f"{_role} model"),
        ((_role, "revision"), f"{_role} revision"),
        ((_role, "weights_digest"), f"{_role} weights digest"),
        ((_role, "tokenizer_digest"), f"{_role} tokenizer or chat template"),
        ((_role, "chat_template"), f"{_role} chat-template mode"),
        ((_role, "dtype"), f"{_role} dtype"),
        ((_role, "backend"), f"{_role} backend"),
        ((_role, "backend_version"), f"{_role} backend version"),
        ((_role, "fp32_head"), f"{_role} fp32 head"),
    ]


def new_manifest(header: dict) -> dict:
    """A manifest with no shards yet. `header` holds pairs, length_rule, shard_size,
    num_shards, teacher, reference (see data_specs/cache.v1.md)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "dadpo_version": __version__,
        "tokenization_rule": 1,
        **header,
        "shards": [],
        "complete": False,
        "totals": {"rows": 0, "dropped": 0, "shards_done": 0},
    }


def _get(record: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def differences(existing: dict, requested: dict) -> list[str]:
    """Each guarded field that differs, as 'label: X in the cache, Y requested'."""
    found = []
    for path, label in GUARDED:
        have, want = _get(existing, path), _get(requested, path)
        if have != want:
            found.append(f"{label}: {_short(have)} in the cache, {_short(want)} requested")
    return found


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def manifest_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: Path) -> dict | None:
    path = manifest_path(cache_dir)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{path}: unreadable manifest ({exc})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DadpoError(
            f"{path}: cache schema version {manifest.get('schema_version')!r}, this dadpo reads {SCHEMA_VERSION}"
        )
    validate_json(manifest, "manifest.v1.schema.json", where=str(path))
    return manifest


def write_json_atomic(path: Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(cache_dir: Path):
    """Exclusive advisory lock for read-modify-write of the manifest."""
    with open(Path(cache_dir) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_shard(cache_dir: Path, entry: dict) -> dict:
    """Add (or replace) one finished shard's entry and rewrite manifest and dropped-ids file."""
    cache_dir = Path(cache_dir)
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        shards = {s["index"]: s for s in manifest["shards"]}
        shards[entry["index"]] = entry
        manifest["shards"] = [shards[i] for i in sorted(shards)]
        manifest["totals"] = {
            "rows": sum(s["rows"] for s in manifest["shards"]),
            "dropped": sum(len(s["dropped_ids"]) for s in manifest["shards"]),
            "shards_done": len(manifest["shards"]),
        }
        manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
        dropped = [pair_id for s in manifest["shards"] for pair_id in s["dropped_ids"]]
        write_text_atomic(cache_dir / DROPPED_NAME, "".join(f"{pair_id}\n" for pair_id in dropped))
        write_json_atomic(manifest_path(cache_dir), manifest)
        return manifest


def missing_shards(manifest: dict) -> list[int]:
    done = {s["index"] for s in manifest["shards"]}
    return [i for i in range(manifest["num_shards"]) if i not in done]
