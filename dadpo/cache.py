"""Cache shards on disk (data_specs/cache.v1.md): atomic Parquet writes and checked reads.

Layout of a cache folder:
    manifest.json                     what produced the numbers; every finished shard
    shards/shard-00000-of-00004.parquet   the rows training reads (columns: cache.v1.columns.json)
    dropped_ids.txt                   ids of pairs dropped by the length rule
    work/pairs.parquet                normalised pairs, shared by the scoring passes
    work/teacher/00000.parquet        per-pass partial results, removed once a shard is assembled
    work/reference/00000.parquet
    .lock                             flock'd while the manifest is updated

Every file is written to a temporary name, fsynced and renamed (dadpo.atomic), so a file under
its final name is always whole: a crash leaves either nothing or a complete file. Readers
(open_cache: train, verify-cache, inspect) refuse an incomplete cache naming the missing shards,
and check every shard's size, sha256, row count and columns against the manifest, whose shard
entries can only name files inside CACHE/shards/ (dadpo.manifest.check_shard_entries).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.atomic import publish, temp_path
from dadpo.errors import DadpoError
from dadpo.manifest import expected_shard_file, missing_shards, read_manifest
from dadpo.specs import load_spec

SHARDS_DIR = "shards"
WORK_DIR = "work"
_REPAIR = "re-run the cache-teacher command that made it to recompute it"


def shard_columns() -> dict[str, pa.DataType]:
    """The fixed shard columns and their Arrow types, from data_specs/cache.v1.columns.json."""
    names = {"int64": pa.int64(), "int32": pa.int32(), "double": pa.float64(), "string": pa.string(),
             "list<int32>": pa.list_(pa.int32())}
    spec = load_spec("cache.v1.columns.json")["columns"]
    return {column: names[type_name] for column, type_name in spec.items()}


def shard_file(index: int, num_shards: int) -> str:
    return expected_shard_file(index, num_shards)


def part_path(cache_dir: Path, role: str, index: int) -> Path:
    return Path(cache_dir) / WORK_DIR / role / f"{index:05d}.parquet"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet_atomic(table: pa.Table, path: Path) -> str:
    """Write `table` to `path` via a temporary name; return the file's sha256."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, compression="zstd")
        digest = sha256_file(tmp)
        publish(tmp, path)
    except OSError as exc:  # disk full, permissions, a folder removed under us
        tmp.unlink(missing_ok=True)
        raise DadpoError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return digest


@dataclass
class Cache:
    """A finished cache folder and its manifest."""

    path: Path
    manifest: dict
    verified: set = field(default_factory=set, repr=False)  # shard indices checked since opening

    @property
    def reference(self) -> dict:
        return self.manifest["reference"]

    @property
    def teacher(self) -> dict:
        return self.manifest["teacher"]

    def verify(self) -> None:
        """Check every shard's size, checksum, row count and columns against the manifest."""
        for entry in self.manifest["shards"]:
            if entry["index"] not in self.verified:
                check_shard(self.path / entry["file"], entry)
                self.verified.add(entry["index"])

    def read(self, columns: list[str] | None = None, verify: bool = True) -> pl.DataFrame:
        """All rows of all shards, in pair order. With verify, shards not yet checked are
        checked against the manifest first."""
        if verify:
            self.verify()
        frames = [pl.read_parquet(self.path / entry["file"], columns=columns) for entry in self.manifest["shards"]]
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()


def check_shard(file: Path, entry: dict) -> None:
    """Raise DadpoError naming `file` unless it is exactly the shard the manifest recorded."""
    if not file.is_file():
        raise DadpoError(f"{file}: shard listed in the manifest is missing; {_REPAIR}")
    size = file.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "altered"
        raise DadpoError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (the shard was {state}); {_REPAIR}")
    if sha256_file(file) != entry["sha256"]:
        raise DadpoError(f"{file}: checksum does not match the manifest (the shard was altered); {_REPAIR}")
    try:
        metadata = pq.ParquetFile(file).metadata
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as exc:
        raise DadpoError(f"{file}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    if metadata.num_rows != entry["rows"]:
        raise DadpoError(f"{file}: {metadata.num_rows} rows, the manifest says {entry['rows']}")
    for column, arrow_type in shard_columns().items():
        if column not in schema.names:
            raise DadpoError(f"{file}: missing column '{column}' (data_specs/cache.v1.columns.json)")
        if not schema.field(column).type.equals(arrow_type):
            raise DadpoError(f"{file}: column '{column}' is {schema.field(column).type}, expected {arrow_type}")


def open_cache(path: str | os.PathLike, flag: str = "--cache", verify: bool = True) -> Cache:
    """Open a cache for reading; refuse one that is missing, foreign, incomplete or (with
    verify, the default) whose shards differ from what the manifest recorded."""
    folder = Path(path)
    if not folder.is_dir():
        raise DadpoError(f"{flag} {path}: no such folder")
    manifest = read_manifest(folder)
    if manifest is None:
        raise DadpoError(f"{flag} {path}: no manifest.json, so not a dadpo cache (make one with dadpo cache-teacher)")
    missing = missing_shards(manifest)
    if missing:
        listed = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DadpoError(
            f"{flag} {path}: incomplete cache, {len(missing)} of {manifest['num_shards']} shards missing "
            f"(shard {listed}); run the cache-teacher command(s) for those workers, or re-run the same "
            "command(s), to finish it"
        )
    cache = Cache(folder, manifest)
    if verify:
        cache.verify()
    return cache
