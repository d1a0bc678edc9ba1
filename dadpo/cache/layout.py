"""A cache folder's layout: names, versions and shard columns (data_specs/cache.v2.md).

    CACHE/manifest.json                        what produced the numbers; every finished shard
    CACHE/shards/shard-00000-of-00004.parquet  the rows training reads
    CACHE/dropped_ids.txt                      ids the length rule dropped
    CACHE/work/pairs.parquet                   the normalised pairs (scratch of an unfinished cache)
    CACHE/work/tokens/00000.parquet            every model's token ids of shard 0, tokenized once
    CACHE/work/<model>/00000.parquet           one model's scores of shard 0, until the shard is assembled
    CACHE/.lock                                flock'd while the manifest is updated
    CACHE/.claims/worker-I-of-N.json           which process works as worker I (host, pid)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from dadpo.specs import load_spec
from dadpo.tokenization import DROPPED_NAME

__all__ = ["DROPPED_NAME", "MANIFEST_NAME", "SCHEMA_VERSION", "shard_columns", "shard_file", "teacher_prefix",
           "work_path"]

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # v1 caches (tokenization rule 1) still train
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
WORK_DIR = "work"
CLAIMS_DIR = ".claims"
REFERENCE = "ref"  # the reference's column prefix

# The shard columns and their Arrow types come from the versioned specs
# (data_specs/cache.v2.columns.json; cache.v1.columns.json for schema 1 caches).
_ARROW = {"int64": pa.int64(), "int32": pa.int32(), "double": pa.float64(), "string": pa.string(),
          "list<int32>": pa.list_(pa.int32())}


def teacher_prefix(name: str) -> str:
    """Column prefix of a teacher: "teacher" for a single unnamed one, "teacher_NAME" otherwise."""
    return "teacher" if not name else f"teacher_{name}"


def shard_columns(teachers, schema_version: int = SCHEMA_VERSION) -> dict[str, pa.DataType]:
    """The fixed columns of a shard, with their Arrow types, for these teacher names (in order)."""
    spec = load_spec(f"cache.v{schema_version}.columns.json")
    if schema_version == 1:
        return {name: _ARROW[kind] for name, kind in spec["columns"].items()}
    columns = {name: _ARROW[kind] for name, kind in spec["pair_columns"].items()}
    for prefix in [teacher_prefix(name) for name in teachers] + [REFERENCE]:
        columns.update({f"{prefix}_{name}": _ARROW[kind] for name, kind in spec["model_columns"].items()})
    columns.update({name: _ARROW[kind] for name, kind in spec["reference_columns"].items()})
    return columns


def shard_file(index: int, num_shards: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}-of-{num_shards:05d}.parquet"


def work_path(cache_dir: Path, part: str, index: int) -> Path:
    """CACHE/work/<part>/NNNNN.parquet: `tokens`, or a model's column prefix for its scores."""
    return Path(cache_dir) / WORK_DIR / part / f"{index:05d}.parquet"
