"""Cache shards: written whole, checked against the manifest on every read.

Shard k holds the pairs [k*shard_size, (k+1)*shard_size) of the pairs file that the length rule
kept, in order: the pair's text, every model's sentence log-probs, token counts and sequence keys,
the reference's token ids (training needs nothing else), then the pairs' extra columns. Every file
is written to a temporary name, fsynced and renamed (dadpo.atomic), so a file under its final name
is always whole. Readers (open_cache: train, verify-cache, inspect) refuse an incomplete cache
naming the missing shards, and check every shard's size, sha256, row count and columns against the
manifest, whose entries can only name files inside CACHE/shards/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.atomic import sha256_file, write_parquet_atomic
from dadpo.cache.layout import REFERENCE, shard_columns, shard_file, teacher_prefix
from dadpo.cache.manifest import missing_shards, read_manifest
from dadpo.errors import DadpoError, one_line
from dadpo.tokenization import legacy_digest

_REPAIR = "re-run the cache-teacher command that made it to recompute it"


def _teachers(manifest: dict) -> dict[str, dict]:
    return manifest["teachers"] if "teachers" in manifest else {"": manifest["teacher"]}


def check_shard(file: Path, entry: dict, manifest: dict) -> None:
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
        raise DadpoError(f"{file}: not a readable Parquet file ({one_line(exc)})") from None
    if metadata.num_rows != entry["rows"]:
        raise DadpoError(f"{file}: {metadata.num_rows} rows, the manifest says {entry['rows']}")
    for column, arrow_type in shard_columns(_teachers(manifest), manifest["schema_version"]).items():
        if column not in schema.names:
            raise DadpoError(f"{file}: missing column '{column}' (data_specs/cache.v{manifest['schema_version']}.md)")
        if not schema.field(column).type.equals(arrow_type):
            raise DadpoError(f"{file}: column '{column}' is {schema.field(column).type}, expected {arrow_type}")


def assemble_shard(out: Path, k: int, manifest: dict, rows: pl.DataFrame, tokens: pa.Table, scores: dict[str, pa.Table],
                   dropped: list[str], counts: dict[str, int]) -> dict:
    """Join the kept pairs of shard k (`rows`: the shard's normalised pairs with their pair_index)
    with every model's scores and the reference's ids; write the shard file; return its manifest
    entry. `scores` maps a column prefix (ref, teacher[_NAME]) to that model's part table, `tokens`
    holds the kept pair indices and every model's ids."""
    kept = tokens["pair_index"].to_pylist()
    for prefix, part in scores.items():
        if part["pair_index"].to_pylist() != kept:
            raise DadpoError(f"{out}: the {prefix} scores of shard {k} hold other pairs than its tokens; "
                             "re-run with --overwrite")
    rows = rows.filter(pl.col("pair_index").is_in(kept))
    columns = {name: rows[name].to_arrow() for name in rows.columns}
    for prefix, part in scores.items():
        columns.update({f"{prefix}_{name}": part[name] for name in part.column_names if name != "pair_index"})
    columns.update({f"{REFERENCE}_{name}": tokens[f"{REFERENCE}_{name}"]
                    for name in ("prompt_ids", "chosen_ids", "rejected_ids")})
    fixed = shard_columns(_teachers(manifest))
    table = pa.table({name: columns[name].cast(kind) for name, kind in fixed.items()})
    for extra in rows.columns:
        if extra not in fixed:
            table = table.append_column(extra, columns[extra])
    file = Path(out) / shard_file(k, manifest["num_shards"])
    # the counts travel in the file too, so a shard adopted after a crash keeps them
    digest = write_parquet_atomic(table, file, metadata={f"dadpo.sequences_{k}": str(v) for k, v in counts.items()})
    return shard_entry(k, manifest, table.num_rows, file, dropped, digest, counts)


def shard_entry(k: int, manifest: dict, num_rows: int, file: Path, dropped: list[str], digest: str | None = None,
                counts: dict | None = None) -> dict:
    """The manifest entry of shard k's file (counts: sequences scored and reused; read from the file's
    metadata when not given)."""
    size = manifest["shard_size"]
    if counts is None:
        metadata = pq.read_schema(file).metadata or {}
        counts = {kind: int(metadata.get(f"dadpo.sequences_{kind}".encode(), b"0")) for kind in ("scored", "reused")}
    return {"index": k, "file": shard_file(k, manifest["num_shards"]), "rows": num_rows,
            "pair_range": [k * size, min((k + 1) * size, manifest["pairs"]["rows"])],
            "sha256": digest or sha256_file(file), "bytes": file.stat().st_size, "dropped_ids": dropped,
            "sequences_scored": counts.get("scored", 0), "sequences_reused": counts.get("reused", 0)}


def whole_unrecorded_shard(out: Path, k: int, manifest: dict, rows: pl.DataFrame, kept: list[int]) -> pa.Table | None:
    """Shard k's file when it is on disk but not in the manifest (killed between the rename and the
    manifest update) and holds exactly the planned pairs with finite scores; else None (a file that
    fails the check is removed, and the shard is computed again)."""
    file = Path(out) / shard_file(k, manifest["num_shards"])
    if not file.exists():
        return None
    try:
        table = pq.read_table(file)
        fixed = shard_columns(_teachers(manifest))
        ok = all(name in table.column_names and table.schema.field(name).type.equals(kind)
                 for name, kind in fixed.items())
        ok = ok and table["pair_index"].to_pylist() == kept
        ok = ok and table["id"].to_pylist() == rows.filter(pl.col("pair_index").is_in(kept))["id"].to_list()
        for name in fixed:
            if "_logp_" in name:
                ok = ok and bool(pl.from_arrow(table[name]).is_finite().all())
    except (pa.ArrowException, OSError):
        ok = False
    if not ok:
        file.unlink(missing_ok=True)
        return None
    return table


# ---------------------------------------------------------------- reading a finished cache


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
    def teachers(self) -> dict[str, dict]:
        """{name: record}; "" names the single unnamed teacher; {} for a reference-only cache."""
        return _teachers(self.manifest)

    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    def same_reference_tokenizer(self, tokenizer) -> bool:
        """Whether `tokenizer` makes the cached reference ids: the same vocabulary (and, in a schema 1
        cache, the same chat template, which that rule's digest covered)."""
        if self.schema_version == 1:
            return legacy_digest(tokenizer, self.reference["chat_template"]) == self.reference["tokenizer_digest"]
        from dadpo.tokenization import vocab_digest

        return vocab_digest(tokenizer) == self.reference["vocab_digest"]

    def verify(self) -> None:
        """Check every shard's size, checksum, row count and columns against the manifest."""
        for entry in self.manifest["shards"]:
            if entry["index"] not in self.verified:
                check_shard(self.path / entry["file"], entry, self.manifest)
                self.verified.add(entry["index"])

    def read(self, columns: list[str] | None = None, verify: bool = True) -> pl.DataFrame:
        """All rows of all shards, in pair order, as Arrow-backed columns (token ids never become
        Python lists here). With verify, shards not yet checked are checked first."""
        if verify:
            self.verify()
        frames = [read_shard(self.path / entry["file"], columns) for entry in self.manifest["shards"]]
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()


def read_shard(file: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """One shard's rows, every value checked (a damaged page, text that is not UTF-8): the checksum
    only tells that the file is the one recorded, not that it was whole when it was recorded."""
    try:
        table = pq.read_table(file, columns=columns)
        table.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise DadpoError(f"{file}: not a readable Parquet file ({one_line(exc)}); {_REPAIR}") from None
    return pl.from_arrow(table)


def open_cache(path: str | os.PathLike, flag: str = "--cache", verify: bool = True) -> Cache:
    """Open a cache for reading; refuse one that is missing, foreign, incomplete or (with verify, the
    default) whose shards differ from what the manifest recorded."""
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
            "command(s), to finish it")
    cache = Cache(folder, manifest)
    if verify:
        cache.verify()
    return cache


__all__ = ["Cache", "open_cache", "check_shard", "assemble_shard", "read_shard", "teacher_prefix"]
