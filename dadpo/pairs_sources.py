"""Read a pairs or prompts source in chunks of rows: JSON Lines, a JSON array (read whole), Parquet,
a datasets.save_to_disk folder, or anything datasets.load_dataset reads (a folder of data files, a
Hub dataset id). Every failure is one DadpoError line naming the source (and the line, for JSON).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.errors import DadpoError, one_line

ABSENT = object()  # a JSON row without the key, told apart from an explicit null
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
_decode = json.JSONDecoder().decode


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class Chunk:
    names: list[str]  # the columns this chunk has, in order (JSON: the union of its rows' keys)
    positions: list[int] | range  # per row: its line (JSONL, 1-based) or its row index (0-based)
    rows: list[dict] | None = None  # JSON sources
    table: pa.Table | None = None  # arrow sources (Parquet, datasets): the columns keep their types

    def values(self, name: str) -> list:
        """Column `name` as Python values, ABSENT where a row lacks it."""
        if self.table is None:
            return [row.get(name, ABSENT) for row in self.rows]
        return self.table.column(name).to_pylist() if name in self.names else [ABSENT] * len(self.positions)


def open_source(source: str, split: str | None, chunk_rows: int) -> tuple[str, Iterator[Chunk]]:
    """("line" or "row": how positions count, the chunks). A single file or a saved Dataset is one
    split, 'train'; `split` picks the split of a saved DatasetDict or of what load_dataset reads."""
    unit, chunks = _open(Path(source), source, split, chunk_rows)
    return unit, _reading(chunks, source)


def _reading(chunks: Iterator[Chunk], source: str) -> Iterator[Chunk]:
    try:
        yield from chunks
    except OSError as e:  # permissions, a file removed under us, a disk error
        raise DadpoError(f"{source}: cannot read ({e.strerror or e})") from None


def _open(path: Path, source: str, split: str | None, chunk_rows: int) -> tuple[str, Iterator[Chunk]]:
    if path.is_file():
        if split not in (None, "train"):
            raise DadpoError(f"{source}: a single file holds one split, 'train'; split {split!r} does not apply")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "line", _jsonl_chunks(path, source, chunk_rows)
        if suffix == ".json":
            return "row", _json_chunks(path, source, chunk_rows)
        if suffix == ".parquet":
            return "row", _table_chunks(_parquet_tables(path, source, chunk_rows), source)
        raise DadpoError(f"{source}: unsupported format; use .parquet, .jsonl or .json, a datasets.save_to_disk "
                         "folder, a folder of data files or a Hub dataset id")
    looks_local = path.suffix.lower() in FILE_SUFFIXES or path.is_absolute() or source.startswith((".", "~"))
    if not path.exists() and looks_local:  # anything else may be a Hub dataset id
        raise DadpoError(f"{source}: no such file")
    return "row", _table_chunks(_dataset_tables(path, source, split, chunk_rows), source)


def _utf8_error(source: str, line: int, data: bytes, error: UnicodeDecodeError) -> DadpoError:
    return DadpoError(f"{source} line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})")


def _object_chunk(rows: list, positions: list[int] | range, source: str, unit: str) -> Chunk:
    names: dict[str, None] = {}  # ordered union of the keys
    for row, position in zip(rows, positions):
        if not isinstance(row, dict):
            raise DadpoError(f"{source} {unit} {position}: expected a JSON object, got {type_name(row)}")
        names.update(dict.fromkeys(row))
    return Chunk(list(names), positions, rows=rows)


def _jsonl_chunks(path: Path, source: str, chunk_rows: int) -> Iterator[Chunk]:
    if path.stat().st_size == 0:
        raise DadpoError(f"{source}: the file is empty")
    rows, lines = [], []
    with open(path, "rb") as f:  # binary: each line is decoded here, to report bad UTF-8 by line
        for line_number, raw in enumerate(f, 1):
            if line_number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not content
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(source, line_number, raw, e) from None
            if not text.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                rows.append(_decode(text))
            except json.JSONDecodeError as e:
                # The usual cause is a writer killed mid-line: say so when it is the last line.
                hint = "" if any(rest.strip() for rest in f) else "; the last line looks truncated"
                raise DadpoError(f"{source} line {line_number}: not valid JSON ({e.msg}: col {e.colno}){hint}") from None
            lines.append(line_number)
            if len(rows) == chunk_rows:
                yield _object_chunk(rows, lines, source, "line")
                rows, lines = [], []
    if rows:
        yield _object_chunk(rows, lines, source, "line")


def _json_chunks(path: Path, source: str, chunk_rows: int) -> Iterator[Chunk]:
    data = path.read_bytes()  # a JSON array cannot be streamed with the standard library: read whole
    if not data.strip():
        raise DadpoError(f"{source}: the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(source, data.count(b"\n", 0, e.start) + 1, data, e) from None
    try:
        rows = _decode(text)
    except json.JSONDecodeError as e:
        hint = "; if it is JSON Lines, name it .jsonl" if e.msg == "Extra data" else ""
        raise DadpoError(f"{source} line {e.lineno}: not valid JSON ({e.msg}: col {e.colno}){hint}") from None
    if not isinstance(rows, list):
        raise DadpoError(f"{source}: expected a top-level list of objects, got {type_name(rows)}")
    del data, text
    for start in range(0, len(rows), chunk_rows):
        yield _object_chunk(rows[start:start + chunk_rows], range(start, min(start + chunk_rows, len(rows))),
                            source, "row")


def _table_chunks(tables: Iterator[pa.Table], source: str) -> Iterator[Chunk]:
    start = 0
    for table in tables:
        for name in table.column_names:
            _check_text(table.column(name), name, source, start)
        yield Chunk(table.column_names, range(start, start + table.num_rows), table=table)
        start += table.num_rows


def _check_text(column: pa.ChunkedArray, name: str, source: str, start: int) -> None:
    """Refuse text that is not UTF-8: Parquet writers need not check it, and Arrow reads it unchecked."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        pass
    else:
        return
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        for offset, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError as e:
                raise DadpoError(f"{source} row {start + offset}: column {name!r} is not valid UTF-8 "
                                 f"(byte 0x{value[e.start]:02x} at offset {e.start})") from None
    raise DadpoError(f"{source} rows {start} to {start + len(column) - 1}: column {name!r} holds invalid data "
                     "(e.g. text that is not UTF-8)")


def _parquet_tables(path: Path, source: str, chunk_rows: int) -> Iterator[pa.Table]:
    if path.stat().st_size == 0:
        raise DadpoError(f"{source}: the file is empty")
    try:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=chunk_rows):
                yield pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError) as e:
        raise DadpoError(f"{source}: not a readable Parquet file ({one_line(e)})") from None


def _dataset_tables(path: Path, source: str, split: str | None, chunk_rows: int) -> Iterator[pa.Table]:
    import datasets  # slow to import; only these sources need it

    saved = path.is_dir() and any((path / name).exists() for name in _SAVED_DATASET_FILES)
    # The Hub client logs each retry of an unreachable server; the failure is told in one line below.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        loaded = datasets.load_from_disk(source) if saved else datasets.load_dataset(source, split=split or "train")
    except Exception as e:  # a damaged folder, no data files, no network, no such dataset: many ways
        what = "could not load the datasets folder" if saved else \
            "not a datasets.save_to_disk folder, and datasets.load_dataset could not load it" if path.is_dir() else \
            "no such file or folder, and datasets.load_dataset could not load it"
        raise DadpoError(f"{source}: {what} ({type(e).__name__}: {one_line(e)})") from None
    finally:
        hub_logger.setLevel(level)
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DadpoError(f"{source}: a DatasetDict with splits {', '.join(loaded)} and no {name!r} split; "
                             "choose one with --split")
        loaded = loaded[name]
    elif saved and split not in (None, "train"):
        raise DadpoError(f"{source}: a saved Dataset holds one split, 'train'; split {split!r} does not apply")
    yield from loaded.with_format("arrow").iter(batch_size=chunk_rows)
