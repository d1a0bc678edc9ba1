"""Load and validate preference pairs and prompts (spec "pairs v2": data_specs/pairs.v2.md).

Every TRL preference layout is read as TRL reads it: an explicit `prompt` with `chosen`/`rejected`
responses; whole conversations in `chosen`/`rejected` (the prompt is the messages they share before
the last assistant turn); TRL's implicit-prompt strings (the prompt is their longest common prefix).

    source --chunks of CHUNK_ROWS--> rules, ids, fingerprint --parts--> one normalised Parquet file

Rows stream in chunks, so memory stays bounded whatever the size of the input (a .json array is the
exception: it is read whole). Every problem raises DadpoError with one line naming the file, the row
(JSONL: the 1-based line; otherwise the 0-based row index; plus the id when given) and the column.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.atomic import temp_path, write_atomic, write_error
from dadpo.errors import DadpoError
from dadpo.pairs_rows import (REQUIRED_COLUMNS, RESPONSE_COLUMNS, SIDES, TOKEN_IDS, ChunkResponses, normalize_id, pair,
                              prompt_only)
from dadpo.pairs_sources import ABSENT, Chunk, open_source
from dadpo.tokenization import PROMPT_FORMATS

CHUNK_ROWS = 4096  # rows read, checked and written at a time: one row group of the normalised file
_RECENT_GROUPS = 2  # row groups NormalizedFile.slice keeps decoded (a slice that straddles two reads both)
canonical_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_PAIRS_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "prompt", *SIDES)] + [
    (name, TOKEN_IDS if name.endswith("_token_ids") else pa.string()) for name in RESPONSE_COLUMNS])
_PROMPTS_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])
_SPEC_COLUMNS = ("id", "prompt", *SIDES, *RESPONSE_COLUMNS)  # never extras (prompts drop the responses)


@dataclass
class NormalizedFile:
    source: str  # the path or dataset id as given
    file: Path  # the normalised Parquet file, one row group per chunk
    num_rows: int
    extra_columns: list[str]
    fingerprint: str  # sha256 over the normalised rows, in order (data_specs/pairs.v2.md)
    prompt_format: str
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)  # removed with us
    _recent_groups: dict = field(default_factory=dict, repr=False, compare=False)  # (group, columns) -> table

    def __len__(self) -> int:
        return self.num_rows

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.file, columns=columns)

    def slice(self, offset: int, length: int, columns: list[str] | None = None) -> pl.DataFrame:
        """Rows [offset, offset + length), reading only the row groups that hold them. The last row
        groups read are kept, so slices in order (shards smaller than a row group) decode each once."""
        with pq.ParquetFile(self.file) as parquet:
            groups, first_row, start = [], 0, 0
            for index in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(index).num_rows
                if start < offset + length and start + rows > offset:
                    first_row = first_row if groups else start
                    groups.append(index)
                start += rows
            if not groups:
                return pl.from_arrow(parquet.schema_arrow.empty_table().select(columns or parquet.schema_arrow.names))
            tables = []
            for index in groups:
                key = (index, None if columns is None else tuple(columns))
                if key not in self._recent_groups:
                    self._recent_groups[key] = parquet.read_row_group(index, columns=columns)
                    while len(self._recent_groups) > _RECENT_GROUPS:
                        del self._recent_groups[next(iter(self._recent_groups))]
                tables.append(self._recent_groups[key])
        return pl.from_arrow(pa.concat_tables(tables)).slice(offset - first_row, length)


class Pairs(NormalizedFile):
    """Columns: id, prompt (canonical JSON), chosen, rejected, the six response columns, the extras."""


class Prompts(NormalizedFile):
    """Columns: id, prompt (canonical JSON), the extras."""


def decode_prompt(prompt_json: str) -> list[dict] | str:
    """The normalised `prompt` column back to messages ([{"role", "content"}, ...]) or raw text."""
    return json.loads(prompt_json)




def load_pairs(path: str | os.PathLike, *, split: str | None = None, prompt_format: str = "chat",
               workdir: str | os.PathLike | None = None, chunk_rows: int | None = None) -> Pairs:
    """Read, check and normalise a pairs file, folder or dataset into workdir/pairs.parquet
    (workdir None: a temporary folder that lives as long as the returned object)."""
    return Pairs(**_load(path, split, prompt_format, workdir, chunk_rows or CHUNK_ROWS, pairs=True))


def load_prompts(path: str | os.PathLike, *, split: str | None = None, prompt_format: str = "chat",
                 workdir: str | os.PathLike | None = None, chunk_rows: int | None = None) -> Prompts:
    """The prompts of a prompts or pairs source, into workdir/prompts.parquet: a `prompt` column (or the
    prompts a conversation or implicit layout implies), an optional `id`; the responses are dropped."""
    return Prompts(**_load(path, split, prompt_format, workdir, chunk_rows or CHUNK_ROWS, pairs=False))


# ---- the walk over a source ---------------------------------------------------------------------


class _Walker:
    """Checks and normalises the rows of one source, chunk by chunk and in order (one code path for
    pairs and prompts); keeps the fingerprint and a 64-bit hash of every id to find duplicates."""

    def __init__(self, source: str, unit: str, pairs: bool, prompt_format: str):
        self.source, self.unit, self.pairs, self.prompt_format = source, unit, pairs, prompt_format
        self.schema = _PAIRS_SCHEMA if pairs else _PROMPTS_SCHEMA
        self.fingerprint = hashlib.sha256()
        self.first_row: dict[str, tuple[bool, int]] = {}  # key -> (in the first row?, that row's position)
        self.hashes, self.positions = [], []

    def _like_first_row(self, key: str, value, position: int, where: str) -> None:
        """JSON rows may leave keys out: the first row decides whether `id` and `prompt` are given."""
        present = value is not ABSENT
        expected, first = self.first_row.setdefault(key, (present, position))
        if present != expected:
            if not present:
                hint = " (give every row an id, or drop the column)" if key == "id" else ""
                raise DadpoError(f"{where}: {key!r} is missing{hint}")
            raise DadpoError(f"{where}: has {key!r} but {self.unit} {first} has none (give every row {key!r}, or none)")

    def chunk(self, chunk: Chunk) -> pa.Table:
        given_ids, prompts, chosens, rejecteds = (chunk.values(name) for name in ("id", "prompt", *SIDES))
        responses = ChunkResponses(chunk) if self.pairs else None
        columns = [[] for _ in range(4 if self.pairs else 2)]
        hashes = np.empty(len(chunk.positions), np.uint64)
        for index, position in enumerate(chunk.positions):
            where = f"{self.source} {self.unit} {position}"
            self._like_first_row("id", given_ids[index], position, where)
            row_id = None if given_ids[index] is ABSENT else normalize_id(given_ids[index], where)
            where = where if row_id is None else f"{where} (id {row_id!r})"
            self._like_first_row("prompt", prompts[index], position, where)
            if prompts[index] is None:
                raise DadpoError(f"{where}: 'prompt' is null")
            if self.pairs:
                prompt, chosen, rejected = pair(prompts[index], chosens[index], rejecteds[index], where,
                                                self.prompt_format)
                fields, token_bytes = responses.row(index, where)
                record = [canonical_json(prompt), chosen, rejected]
            else:
                prompt = prompt_only(prompts[index], chosens[index], rejecteds[index], where, self.prompt_format)
                fields, token_bytes, record = {}, b"", [canonical_json(prompt)]
            if row_id is None:  # same content, same id, whatever the format or the run
                content = canonical_json([prompt, chosen, rejected]) if self.pairs else record[0]
                row_id = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
            # One JSON array per row keeps the field boundaries unambiguous; it holds the token-id
            # counts, so the raw ids after it are unambiguous too.
            line = [row_id, *record, fields] if fields else [row_id, *record]
            self.fingerprint.update(canonical_json(line).encode("utf-8") + b"\n" + token_bytes)
            hashes[index] = int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "little")
            for values, value in zip(columns, [row_id, *record]):
                values.append(value)
        self.hashes.append(hashes)
        self.positions.append(np.asarray(chunk.positions, dtype=np.int64))
        arrays = [pa.array(values, pa.string()) for values in columns] + (responses.columns() if self.pairs else [])
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def check_duplicates(self, id_at) -> None:
        """Refuse the first row (in order) whose id an earlier row has; `id_at(index)` reads an id back,
        so equal hashes are confirmed on the ids themselves."""
        hashes, positions = np.concatenate(self.hashes), np.concatenate(self.positions)
        order = np.argsort(hashes, kind="stable")
        repeats = np.sort(order[1:][hashes[order][1:] == hashes[order][:-1]])
        for later in repeats.tolist():
            for earlier in np.flatnonzero(hashes[:later] == hashes[later]).tolist():
                row_id = id_at(later)
                if id_at(earlier) == row_id:
                    same = "" if self.first_row["id"][0] else \
                        " (identical prompt, chosen and rejected)" if self.pairs else \
                        " (the same prompt twice; give the rows ids to keep both)"
                    raise DadpoError(f"{self.source}: duplicate id {row_id!r} "
                                     f"({self.unit}s {positions[earlier]} and {positions[later]}){same}")


def _parquet_holds(kind: pa.DataType) -> bool:
    """Whether Parquet can store the type: it has no struct without fields, at any depth."""
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(_parquet_holds(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _parquet_holds(kind.value_type)
    if pa.types.is_map(kind):
        return _parquet_holds(kind.key_type) and _parquet_holds(kind.item_type)
    return True


class _Extras:
    """The columns beyond the spec's, in order of first appearance. Arrow sources keep their types;
    JSON values go into the parts as canonical JSON text, their type inferred per chunk and unified at
    the end (a column that no one type holds stays JSON text)."""

    def __init__(self):
        self.kinds: dict[str, list] = {}  # name -> the type of each chunk's values (None: no one type)
        self.typed = False

    def add(self, table: pa.Table, chunk: Chunk) -> pa.Table:
        self.typed = chunk.table is not None
        for name in chunk.names:
            if name in _SPEC_COLUMNS:
                continue
            if self.typed and _parquet_holds(chunk.table.column(name).type):
                array, kind = chunk.table.column(name), None
            else:
                values = [None if value is ABSENT else value for value in chunk.values(name)]
                try:  # pyarrow infers over every value (polars guesses from the first ones)
                    kind = pa.array(values).type
                except (pa.ArrowException, OverflowError, TypeError, ValueError):
                    kind = None
                if self.typed or (kind is not None and not _parquet_holds(kind)):
                    kind = None  # e.g. {} (a struct without fields): the column stays JSON text
                array = pa.array([None if value is None else canonical_json(value) for value in values], pa.string())
            self.kinds.setdefault(name, []).append(kind)
            table = table.append_column(name, array)
        return table

    def final_types(self) -> dict[str, pa.DataType | None]:
        """name -> the type its JSON text becomes; None: the column stays as the parts hold it."""
        types = {}
        for name, kinds in self.kinds.items():
            types[name] = None
            if not self.typed and None not in kinds:
                try:
                    schemas = [pa.schema([(name, kind)]) for kind in kinds]
                    types[name] = pa.unify_schemas(schemas, promote_options="permissive").field(name).type
                except pa.ArrowException:
                    pass
        return types

    @staticmethod
    def column(part: pa.Table, name: str, kind: pa.DataType | None):
        if name not in part.column_names:  # a JSON key that first appeared in a later chunk
            return pa.nulls(part.num_rows, kind or pa.string())
        if kind is None:
            return part.column(name)
        return pa.array([None if text is None else json.loads(text) for text in part.column(name).to_pylist()], kind)


# ---- the whole source ---------------------------------------------------------------------------


def _check_columns(names: list[str], source: str, pairs: bool) -> None:
    if pairs:
        missing = [name for name in REQUIRED_COLUMNS if name not in names]
        expected = "chosen, rejected [, prompt, id]"
    else:
        missing = [] if "prompt" in names or all(side in names for side in SIDES) else ["prompt"]
        expected = "prompt [, id], or chosen and rejected to take the prompts from"
    others = [name for name in names if name not in _SPEC_COLUMNS]
    # A misspelt prompt column would pass as an extra column, and the prompt be taken from the responses.
    if "prompt" not in names and "prompt" not in missing and \
            difflib.get_close_matches("prompt", [name.lower() for name in others], n=1, cutoff=0.85):
        missing.insert(0, "prompt")
    if not missing:
        return
    lowered = {name.lower(): name for name in others}
    guesses = [f"{lowered.get(close[0], close[0])!r} for {name!r}" for name in missing
               if (close := difflib.get_close_matches(name, others, n=1) or
                   difflib.get_close_matches(name, list(lowered), n=1, cutoff=0.85))]
    guess = f"; did you mean {', '.join(guesses)}?" if guesses else ""
    raise DadpoError(f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                     f"(found: {', '.join(map(_shown, names)) or 'none'}){guess}; expected {expected}")


def _shown(name: str) -> str:
    """A column name as a message shows it: as it is, or quoted when it has odd characters (a line break)."""
    return name if name and name.isprintable() and name.strip() == name and "," not in name else repr(name)


def _load(path, split: str | None, prompt_format: str, workdir, chunk_rows: int, pairs: bool) -> dict:
    source = os.fspath(path)
    if prompt_format not in PROMPT_FORMATS:
        raise DadpoError(f"prompt format {prompt_format!r}: expected {' or '.join(PROMPT_FORMATS)}")
    if chunk_rows < 1:
        raise DadpoError(f"chunk_rows {chunk_rows}: must be at least 1")
    unit, chunks = open_source(source, split, chunk_rows)
    folder = tempfile.TemporaryDirectory(prefix="dadpo-pairs-") if workdir is None else None
    out_dir = Path(folder.name if folder else workdir)
    final = out_dir / ("pairs.parquet" if pairs else "prompts.parquet")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out_dir, e) from None
    # The parts are temporary files beside the result (dadpo.atomic names), so a killed run's are swept.
    walker, extras, parts, part_files = _Walker(source, unit, pairs, prompt_format), _Extras(), [], []
    try:
        for chunk in chunks:
            if not chunk.positions:
                continue
            if not parts:
                _check_columns(chunk.names, source, pairs)
            table = extras.add(walker.chunk(chunk), chunk)
            part_files.append(temp_path(final.with_name(f"{final.name}.part{len(parts):06d}")))
            try:
                pq.write_table(table, part_files[-1], compression="lz4")
            except OSError as e:
                raise write_error(part_files[-1], e) from None
            parts.append((part_files[-1], table.num_rows))
        if not parts:
            raise DadpoError(f"{source}: has no rows")
        starts = np.cumsum([0] + [rows for _, rows in parts])

        def id_at(index: int) -> str:
            k = int(np.searchsorted(starts, index, side="right")) - 1
            return pq.read_table(parts[k][0], columns=["id"]).column(0)[index - int(starts[k])].as_py()

        walker.check_duplicates(id_at)
        extra_columns = _merge([part for part, _ in parts], walker.schema, extras, final)
    except BaseException:
        if folder is not None:
            folder.cleanup()
        raise
    finally:
        for part in part_files:
            part.unlink(missing_ok=True)
    return {"source": source, "file": final, "num_rows": int(starts[-1]), "extra_columns": extra_columns,
            "fingerprint": walker.fingerprint.hexdigest(), "prompt_format": prompt_format, "_folder": folder}


def _merge(parts: list[Path], schema: pa.Schema, extras: _Extras, final: Path) -> list[str]:
    """The parts, extras in their final types, into `final` (written whole: dadpo.atomic)."""
    types = extras.final_types()

    def write(tmp: Path) -> None:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                arrays = [table.column(name) for name in schema.names] + \
                    [extras.column(table, name, kind) for name, kind in types.items()]
                if writer is None:  # the first part fixes the types of the arrow extras
                    extra_fields = [pa.field(name, array.type) for name, array in zip(types, arrays[len(schema):])]
                    full = pa.schema([*schema, *extra_fields])
                    writer = pq.ParquetWriter(tmp, full, compression="zstd")
                writer.write_table(pa.Table.from_arrays(arrays, schema=full))
        finally:
            if writer is not None and writer.is_open:
                writer.close()

    write_atomic(final, write)
    return list(types)
