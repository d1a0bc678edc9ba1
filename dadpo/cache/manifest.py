"""The cache manifest (data_specs/cache.v2.md): what produced the numbers, and which shards exist.

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
from dadpo.cache.layout import DROPPED_NAME, MANIFEST_NAME, READABLE_SCHEMAS, SCHEMA_VERSION, shard_file
from dadpo.errors import DadpoError, one_line
from dadpo.specs import validate_json
from dadpo.tokenization import RULE_VERSION

# What must match for cached numbers to be comparable: (key path, label for the message).
GUARDED = [
    (("pairs", "fingerprint"), "pairs content (fingerprint)"),
    (("pairs", "rows"), "number of pairs"),
    (("pairs", "extra_columns"), "pairs extra columns"),
    (("pairs", "prompt_format"), "prompt format"),
    (("shard_size",), "shard size"),
    (("length_rule", "max_length"), "max length"),
    (("length_rule", "on_overlong"), "on-overlong rule"),
]
MODEL_GUARDED = [
    ("model", "model"), ("revision", "revision"), ("weights_digest", "weights digest"),
    ("tokenizer_digest", "tokenizer, chat template, template variables or date"),
    ("chat_template", "chat-template mode"), ("template_kwargs", "template variables"),
    ("template_date", "template date"),
    # the ids a response ends with: the digest covers what decides them, but not an older dadpo that
    # derived them otherwise (before special_ids, an unlisted special end-of-turn token was missed)
    ("end_of_turn", "end-of-turn tokens"), ("stop_ids", "stop tokens"),
    ("dtype", "dtype"), ("backend", "backend"),
    ("backend_version", "backend version"), ("fp32_head", "fp32 head"), ("server", "server"),
]


def new_manifest(header: dict) -> dict:
    """A manifest with no shards yet. `header` holds pairs, length_rule, shard_size, num_shards,
    reference, teachers (see data_specs/cache.v2.md)."""
    return {"schema_version": SCHEMA_VERSION, "dadpo_version": __version__, "tokenization_rule": RULE_VERSION,
            **header, "shards": [], "complete": False, "totals": _totals([])}


def model_records(manifest: dict) -> dict[str, dict]:
    """{role: record}: "reference" and "teacher" or "teacher:NAME" for each teacher (schema 1 too)."""
    teachers = manifest.get("teachers")
    if teachers is None:  # schema 1: one unnamed teacher
        teachers = {"": manifest["teacher"]}
    return {"reference": manifest["reference"], **{f"teacher:{name}" if name else "teacher": record
                                                   for name, record in teachers.items()}}


def reuse_identity(record: dict) -> dict:
    """What must match for a model's cached scores to be copied into another cache (--reuse-from): the
    scores are keyed on the token ids, so the weights and how they ran decide, not the template."""
    return {key: _field_for_comparison(record, key)
            for key in ("model", "revision", "weights_digest", "dtype", "backend", "backend_version", "fp32_head", "server")}


def differences(existing: dict, requested: dict) -> list[str]:
    """Each guarded field that differs, as 'label: X in the cache, Y requested'."""
    if existing.get("schema_version") != requested.get("schema_version"):
        return [f"cache schema {existing.get('schema_version')} (tokenization rule "
                f"{existing.get('tokenization_rule')}) in the cache, schema {requested['schema_version']} (rule "
                f"{requested['tokenization_rule']}, data_specs/tokenization.v2.md) requested; training from the old "
                "cache still works"]
    found = [_differ(label, _get(existing, path), _get(requested, path)) for path, label in GUARDED]
    have, want = model_records(existing), model_records(requested)
    if set(have) != set(want):
        found.append(f"models: {sorted(have)} in the cache, {sorted(want)} requested")
    for role in sorted(set(have) & set(want)):
        found += [_differ(f"{role} {label}", _field_for_comparison(have[role], key),
                          _field_for_comparison(want[role], key)) for key, label in MODEL_GUARDED]
    return [line for line in found if line]


def _field_for_comparison(record: dict, key: str):
    # a served model is the same model wherever it is served from: its URL may change between runs
    value = record.get(key)
    return {k: v for k, v in value.items() if k != "url"} if key == "server" and isinstance(value, dict) else value


def _differ(label: str, have, want) -> str | None:
    return None if have == want else f"{label}: {_short(have)} in the cache, {_short(want)} requested"


def _get(record: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


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
        raise DadpoError(f"{path}: unreadable manifest ({one_line(exc)})") from None
    if not isinstance(manifest, dict):
        raise DadpoError(f"{path}: not a dadpo manifest (expected a JSON object)")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise DadpoError(f"{path}: cache schema version {version!r}, this dadpo reads "
                         f"{', '.join(map(str, READABLE_SCHEMAS))}")
    check_shard_entries(manifest, path)
    validate_json(manifest, f"manifest.v{version}.schema.json", where=str(path))
    return manifest


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
        expected = shard_file(index, num_shards)
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


def _totals(shards: list[dict]) -> dict:
    return {"rows": sum(s["rows"] for s in shards), "dropped": sum(len(s["dropped_ids"]) for s in shards),
            "shards_done": len(shards), "sequences_scored": sum(s.get("sequences_scored", 0) for s in shards),
            "sequences_reused": sum(s.get("sequences_reused", 0) for s in shards)}


def _update_shards(cache_dir: Path, change) -> dict:
    # Read-modify-write under the lock, so concurrent workers never lose each other's shards.
    cache_dir = Path(cache_dir)
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        shards = change({s["index"]: s for s in manifest["shards"]})
        manifest["shards"] = [shards[i] for i in sorted(shards)]
        manifest["totals"] = _totals(manifest["shards"])
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
