"""Cache shards on disk (data_specs/cache.v1.md): atomic Parquet writes and checked reads.

Layout of a cache folder:
    manifest.json                     what produced the numbers; every finished shard
    shards/shard-00000-of-00004.parquet   the rows training reads (columns: cache.v1.columns.json)
    dropped_ids.txt                   ids of pairs dropped by the length rule
    work/pairs.parquet                normalised pairs, shared by the scoring passes
    work/teacher/00000.parquet        per-pass partial results, removed once a shard is assembled
    work/reference/00000.parquet

Every file is written to a temporary name, fsynced and renamed, so a file under its final
name is always whole: a crash leaves either nothing or a complete file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.errors import DadpoError
from dadpo.manifest import missing_shards, read_manifest
from dadpo.specs import load_spec

SHARDS_DIR = "shards"
WORK_DIR = "work"


def shard_columns() -> dict[str, pa.DataType]:
    """The fixed shard columns and their Arrow types, from data_specs/cache.v1.columns.json."""
    names = {"int64": pa.int64(), "int32": pa.int32(), "double": pa.float64(), "string": pa.string(),
             "list<int32>": pa.list_(pa.int32())}
    spec = load_spec("cache.v1.columns.json")["columns"]
    return {column: names[type_name] for column, type_name in spec.items()}


def shard_file(index: int, num_shards: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}-of-{num_shards:05d}.parquet"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


@dataclass
class Cache:
    """A finished cache folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def reference(self) -> dict:
        return self.manifest["reference"]

    @property
    def teacher(self) -> dict:
        return self.manifest["teacher"]

    def read(self, columns: list[str] | None = None, verify: bool = True) -> pl.DataFrame:
        """All rows of all shards, in pair order. With verify, each shard's size, checksum and
        row count are checked against the manifest first."""
        frames = []
        for entry in self.manifest["shards"]:
            file = self.path / entry["file"]
            if verify:
                check_shard(file, entry)
            frames.append(pl.read_parquet(file, columns=columns))
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()


def check_shard(file: Path, entry: dict) -> None:
    if not file.is_file():
        raise DadpoError(f"{file}: shard listed in the manifest is missing")
    if sha256_file(file) != entry["sha256"]:
        raise DadpoError(f"{file}: checksum does not match the manifest (the shard was altered or truncated)")
    rows = pq.ParquetFile(file).metadata.num_rows
    if rows != entry["rows"]:
        raise DadpoError(f"{file}: {rows} rows, the manifest says {entry['rows']}")
    schema = pq.read_schema(file)
    for column, arrow_type in shard_columns().items():
        if column not in schema.names:
            raise DadpoError(f"{file}: missing column '{column}' (data_specs/cache.v1.columns.json)")
        if not schema.field(column).type.equals(arrow_type):
            raise DadpoError(f"{file}: column '{column}' is {schema.field(column).type}, expected {arrow_type}")


def open_cache(path: str | os.PathLike, flag: str = "--cache") -> Cache:
    """Open a cache for reading; refuse one that is missing, foreign or incomplete."""
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
            f"(shard {listed}); re-run the same cache-teacher command(s) to finish it"
        )
    return Cache(folder, manifest)
