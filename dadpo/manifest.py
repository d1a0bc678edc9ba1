"""The cache manifest (data_specs/cache.v1.md): what produced the numbers, and which shards exist.

manifest.json is only ever replaced whole (dadpo.atomic), under an advisory lock (flock) on
CACHE/.lock, so any number of uncoordinated workers can record their shards into one folder and a
reader never sees a half-written manifest. On a shared filesystem flock must work across nodes
(NFSv4 does; Lustre needs the `flock` mount option).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from dadpo import __version__
from dadpo.atomic import write_json_atomic, write_text_atomic
from dadpo.errors import DadpoError
from dadpo.specs import validate_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DROPPED_NAME = "dropped_ids.txt"

# What must match for cached numbers to be comparable: (key path, label for the message).
GUARDED = [
    (("schema_version",), "schema version"),
    (("pairs", "fingerprint"), "pairs content (fingerprint)"),
    (("pairs", "rows"), "number of pairs"),
    (("pairs", "extra_columns"), "pairs extra columns"),
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
        raise DadpoError(f"{path}: unreadable manifest ({' '.join(str(exc).split())})") from None
    if not isinstance(manifest, dict):
        raise DadpoError(f"{path}: not a dadpo manifest (expected a JSON object)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DadpoError(
            f"{path}: cache schema version {manifest.get('schema_version')!r}, this dadpo reads {SCHEMA_VERSION}"
        )
    check_shard_entries(manifest, path)
    validate_json(manifest, "manifest.v1.schema.json", where=str(path))
    return manifest


def expected_shard_file(index: int, num_shards: int) -> str:
    return f"shards/shard-{index:05d}-of-{num_shards:05d}.parquet"


def check_shard_entries(manifest: dict, where: Path) -> None:
    """Each shard entry names exactly the file its index implies, so a reader only ever opens
    CACHE/shards/shard-K-of-N.parquet: an edited manifest cannot point outside the folder."""
    num_shards, shards = manifest.get("num_shards"), manifest.get("shards")
    if not isinstance(num_shards, int) or not isinstance(shards, list):
        return  # the schema check that follows names what is wrong
    seen = set()
    for position, entry in enumerate(shards):
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_shards:
            raise DadpoError(f"{where}: shards[{position}] has index {index!r}, expected 0..{num_shards - 1}")
        if index in seen:
            raise DadpoError(f"{where}: shard {index} is listed twice")
        seen.add(index)
        expected = expected_shard_file(index, num_shards)
        if entry.get("file") != expected:
            raise DadpoError(f"{where}: shard {index} names file {entry.get('file')!r}, expected {expected!r} "
                             "(shard files must stay inside the cache folder)")


@contextlib.contextmanager
def locked(cache_dir: Path):
    """Exclusive advisory lock for read-modify-write of the manifest."""
    try:
        handle = open(Path(cache_dir) / ".lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as exc:
        raise DadpoError(f"{cache_dir}: cannot lock .lock ({exc.strerror or exc}); the filesystem must support "
                         "flock") from None
    with handle:
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_shard(cache_dir: Path, entry: dict) -> dict:
    """Add (or replace) one finished shard's entry; the last shard recorded marks the cache complete."""
    return _update_shards(cache_dir, lambda shards: {**shards, entry["index"]: entry})


def forget_shard(cache_dir: Path, index: int) -> dict:
    """Remove one shard's entry (its file failed verification and will be recomputed)."""
    return _update_shards(cache_dir, lambda shards: {k: v for k, v in shards.items() if k != index})


def _update_shards(cache_dir: Path, change) -> dict:
    # Read-modify-write under the lock, so concurrent workers never lose each other's shards.
    cache_dir = Path(cache_dir)
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        shards = change({s["index"]: s for s in manifest["shards"]})
        manifest["shards"] = [shards[i] for i in sorted(shards)]
        manifest["totals"] = {
            "rows": sum(s["rows"] for s in manifest["shards"]),
            "dropped": sum(len(s["dropped_ids"]) for s in manifest["shards"]),
            "shards_done": len(manifest["shards"]),
        }
        manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
        # dropped_ids.txt first: a crash between the two writes leaves the shard unrecorded,
        # and the re-run that records it rewrites both.
        write_dropped_ids(cache_dir, manifest)
        write_json_atomic(manifest_path(cache_dir), manifest)
        return manifest


def write_dropped_ids(cache_dir: Path, manifest: dict) -> None:
    """CACHE/dropped_ids.txt: the ids the length rule dropped, one a line, in pair order."""
    dropped = [pair_id for s in manifest["shards"] for pair_id in s["dropped_ids"]]
    write_text_atomic(Path(cache_dir) / DROPPED_NAME, "".join(f"{pair_id}\n" for pair_id in dropped))


def missing_shards(manifest: dict) -> list[int]:
    done = {s["index"] for s in manifest["shards"]}
    return [i for i in range(manifest["num_shards"]) if i not in done]
