"""Load and validate the pairs input (spec "pairs v1").

A pairs file holds TRL-style preference pairs: `prompt` (a string or a list of {role, content}
messages), `chosen` (the teacher's response) and `rejected` (the student's), each response a string
or a one-message assistant list; an optional `id`; any other columns travel through unchanged.
Formats: .parquet, .jsonl, .json (a top-level list of objects), or a datasets save_to_disk folder.

Every problem raises DadpoError with one line naming the file, the row (JSONL: the 1-based line;
otherwise the 0-based row index; plus the id when known) and the column.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from dadpo.errors import DadpoError
from dadpo.specs import load_spec

# The format's rules come from its versioned spec (data_specs/pairs.v1.schema.json).
_SPEC = load_spec("pairs.v1.schema.json")
REQUIRED_COLUMNS = tuple(_SPEC["required"])
ALLOWED_ROLES = tuple(_SPEC["$defs"]["message"]["properties"]["role"]["enum"])
_ABSENT = object()  # a JSON row without the key, told apart from an explicit null
_decode = json.JSONDecoder().decode
_canonical_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass
class Pairs:
    source: str  # the path as given
    frame: pl.DataFrame  # id, prompt (canonical messages JSON), chosen, rejected, then the extras
    extra_columns: list[str]
    fingerprint: str  # sha256 over the normalized (id, prompt, chosen, rejected) of every row, in order

    def __len__(self) -> int:
        return self.frame.height


def prompt_messages(prompt_json: str) -> list[dict]:
    """Decode the canonical `prompt` column back to [{"role", "content"}, ...]."""
    return json.loads(prompt_json)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# ---- reading: every format becomes column name -> python values, one per row ------------------


@dataclass
class _Columns:
    names: list[str]  # in file order
    values: dict[str, list]  # the columns we validate (JSON: all of them)
    num_rows: int
    line_numbers: list[int] | None  # JSONL: the line each row came from
    arrow: pa.Table | None  # Parquet/datasets: extra columns keep their arrow types


def _object_rows(rows: list, line_numbers: list[int] | None, source: str) -> _Columns:
    names: dict[str, None] = {}  # ordered union of the keys
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"line {line_numbers[index]}" if line_numbers else f"row {index}"
            raise DadpoError(f"{source} {where}: expected a JSON object, got {_type_name(row)}")
        names.update(dict.fromkeys(row))
    values = {name: [row.get(name, _ABSENT) for row in rows] for name in names}
    return _Columns(list(names), values, len(rows), line_numbers, None)


def _utf8_error(source: str, line: int, data: bytes, error: UnicodeDecodeError) -> DadpoError:
    byte = data[error.start]
    return DadpoError(f"{source} line {line}: not valid UTF-8 (byte 0x{byte:02x} at offset {error.start})")


def _read_jsonl(path: Path, source: str) -> _Columns:
    rows, line_numbers = [], []
    with open(path, "rb") as f:  # binary: we decode each line ourselves to report bad UTF-8 by line
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
                raise DadpoError(
                    f"{source} line {line_number}: not valid JSON ({e.msg}: col {e.colno}){hint}"
                ) from None
            line_numbers.append(line_number)
    if not rows and path.stat().st_size == 0:
        raise DadpoError(f"{source}: the file is empty")
    return _object_rows(rows, line_numbers, source)


def _read_json(path: Path, source: str) -> _Columns:
    data = path.read_bytes()
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
        raise DadpoError(f"{source}: expected a top-level list of objects, got {_type_name(rows)}")
    return _object_rows(rows, None, source)


def _arrow_columns(table: pa.Table) -> _Columns:
    # Only the columns we validate become python objects; the extras stay arrow.
    wanted = [name for name in table.column_names if name in REQUIRED_COLUMNS or name == "id"]
    values = {name: table.column(name).to_pylist() for name in wanted}
    return _Columns(table.column_names, values, table.num_rows, None, table)


def _read_parquet(path: Path, source: str) -> _Columns:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DadpoError(f"{source}: the file is empty")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        detail = " ".join(str(e).split())  # arrow's text can span lines; ours is one
        raise DadpoError(f"{source}: not a readable Parquet file ({detail})") from None
    return _arrow_columns(table)


def _read_datasets_folder(path: Path, source: str) -> _Columns:
    import datasets  # slow to import; only this format needs it

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder fails in many ways
        detail = " ".join(str(e).split())
        raise DadpoError(f"{source}: could not load the datasets folder ({type(e).__name__}: {detail})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DadpoError(
                f"{source}: a DatasetDict with splits {', '.join(loaded)} and no 'train' split; "
                "save a single Dataset, or the pairs as the 'train' split"
            )
        loaded = loaded["train"]
    return _arrow_columns(loaded.with_format("arrow")[:])


def _read(path: Path, source: str) -> _Columns:
    if not path.exists():
        raise DadpoError(f"{source}: no such file")
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _read_datasets_folder(path, source)
        raise DadpoError(
            f"{source}: a folder, but not a datasets.save_to_disk folder (no dataset_info.json or state.json)"
        )
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}.get(path.suffix.lower())
    if reader is None:
        raise DadpoError(f"{source}: unsupported format; use .parquet, .jsonl, .json or a datasets.save_to_disk folder")
    return reader(path, source)


# ---- validation and normalization -------------------------------------------------------------


def _check_columns(columns: _Columns, source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in columns.names]
    if not missing:
        return
    others = [name for name in columns.names if name not in REQUIRED_COLUMNS]
    guesses = [
        f"'{close[0]}' for '{name}'"
        for name in missing
        if (close := difflib.get_close_matches(name, others, n=1))
    ]
    guess = f"; did you mean {', '.join(guesses)}?" if guesses else ""
    raise DadpoError(
        f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
        f"(found: {', '.join(columns.names) or 'none'}){guess}; expected prompt, chosen, rejected [, id]"
    )


def _absent_or_null(value, column: str, where: str) -> None:
    if value is _ABSENT or value is None:
        raise DadpoError(f"{where}: {column!r} is {'missing' if value is _ABSENT else 'null'}")


def _normalize_prompt(value, where: str) -> list[dict]:
    _absent_or_null(value, "prompt", where)
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    elif not isinstance(value, list):
        raise DadpoError(
            f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, got {_type_name(value)}"
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DadpoError(
                f"{where}: 'prompt' message {index} must be a {{role, content}} object, got {_type_name(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ALLOWED_ROLES:
            problem = "no role" if role is None else f"unknown role {role!r}"
            raise DadpoError(f"{where}: 'prompt' message {index} has {problem} (allowed: {', '.join(ALLOWED_ROLES)})")
        if not isinstance(content, str):
            raise DadpoError(f"{where}: 'prompt' message {index} 'content' must be a string, got {_type_name(content)}")
        messages.append({"role": role, "content": content})
    # An assistant turn may be empty; a prompt with nothing to say may not.
    if not any(message["content"].strip() for message in messages):
        raise DadpoError(f"{where}: 'prompt' is empty")
    return messages


def _normalize_response(value, column: str, where: str) -> str:
    _absent_or_null(value, column, where)
    expected = f"{where}: {column!r} must be a string or a one-message assistant list"
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            got = f"a list of {len(value)} messages" if len(value) != 1 else f"a list holding {_type_name(value[0])}"
            raise DadpoError(f"{expected}, got {got}")
        role, value = value[0].get("role"), value[0].get("content")
        if role != "assistant":
            raise DadpoError(f"{where}: {column!r} message has role {role!r}; expected 'assistant'")
        if not isinstance(value, str):
            raise DadpoError(f"{where}: {column!r} message 'content' must be a string, got {_type_name(value)}")
    elif not isinstance(value, str):
        raise DadpoError(f"{expected}, got {_type_name(value)}")
    if not value.strip():
        raise DadpoError(f"{where}: {column!r} is empty")
    return value


def _normalize_id(value, where: str) -> str:
    if value is _ABSENT or value is None:
        state = "missing" if value is _ABSENT else "null"
        raise DadpoError(f"{where}: 'id' is {state} (give every row an id, or drop the column)")
    if isinstance(value, int) and not isinstance(value, bool):  # True as an id is surely a mistake
        return str(value)
    if not isinstance(value, str):
        raise DadpoError(f"{where}: 'id' must be a string or an integer, got {_type_name(value)}")
    if not value.strip():
        raise DadpoError(f"{where}: 'id' is empty")
    return value


def _extra_series(name: str, columns: _Columns) -> pl.Series:
    if columns.arrow is not None:
        try:
            return pl.from_arrow(columns.arrow.column(name)).alias(name)
        except Exception:  # an arrow type polars lacks: go through python values
            values = columns.arrow.column(name).to_pylist()
    else:
        values = [None if value is _ABSENT else value for value in columns.values[name]]
    try:
        # pyarrow infers over every value; polars guesses from the first ones and can drop struct fields.
        return pl.from_arrow(pa.array(values)).alias(name)
    except Exception:  # mixed types that no one column type holds: keep them as JSON text
        return pl.Series(name, [None if v is None else _canonical_json(v) for v in values], dtype=pl.Utf8)


# ---- the whole file ---------------------------------------------------------------------------


def load_pairs(path: str | os.PathLike) -> Pairs:
    source = os.fspath(path)
    columns = _read(Path(source), source)
    if columns.num_rows == 0:
        raise DadpoError(f"{source}: has no rows")
    _check_columns(columns, source)
    prompts, chosens, rejecteds = (columns.values[name] for name in REQUIRED_COLUMNS)
    given_ids, line_numbers = columns.values.get("id"), columns.line_numbers
    unit = "line" if line_numbers else "row"

    ids, prompt_jsons, chosen_out, rejected_out = [], [], [], []
    first_seen: dict[str, int] = {}
    fingerprint = hashlib.sha256()
    for index in range(columns.num_rows):
        position = line_numbers[index] if line_numbers else index
        where = f"{source} {unit} {position}"
        row_id = None
        if given_ids is not None:
            row_id = _normalize_id(given_ids[index], where)
            where = f"{where} (id {row_id!r})"
        messages = _normalize_prompt(prompts[index], where)
        chosen = _normalize_response(chosens[index], "chosen", where)
        rejected = _normalize_response(rejecteds[index], "rejected", where)
        prompt_json = _canonical_json(messages)
        if row_id is None:  # same content, same id, whatever the format or the run
            content = _canonical_json([messages, chosen, rejected]).encode("utf-8")
            row_id = hashlib.sha256(content).hexdigest()[:16]
        if row_id in first_seen:
            same = " (identical prompt, chosen and rejected)" if given_ids is None else ""
            raise DadpoError(f"{source}: duplicate id {row_id!r} ({unit}s {first_seen[row_id]} and {position}){same}")
        first_seen[row_id] = position
        # One JSON array per row keeps the field boundaries unambiguous.
        fingerprint.update(_canonical_json([row_id, prompt_json, chosen, rejected]).encode("utf-8") + b"\n")
        ids.append(row_id)
        prompt_jsons.append(prompt_json)
        chosen_out.append(chosen)
        rejected_out.append(rejected)

    extra_columns = [name for name in columns.names if name not in REQUIRED_COLUMNS and name != "id"]
    frame = pl.DataFrame(
        [
            pl.Series("id", ids, dtype=pl.Utf8),
            pl.Series("prompt", prompt_jsons, dtype=pl.Utf8),
            pl.Series("chosen", chosen_out, dtype=pl.Utf8),
            pl.Series("rejected", rejected_out, dtype=pl.Utf8),
            *(_extra_series(name, columns) for name in extra_columns),
        ]
    )
    return Pairs(source, frame, extra_columns, fingerprint.hexdigest())


# ---- pairs v2 response columns (interim; the full v2 loader replaces this module) ----------------

PROMPT_FORMATS = ("chat", "raw")
RESPONSE_FIELDS = ("token_ids", "token_ids_vocab", "finish_reason")


@dataclass(frozen=True)
class Response:
    """One response of a pair: its text and, when `dadpo generate` sampled it, the sampled ids."""

    text: str
    token_ids: tuple[int, ...] | None = None  # as sampled, the stop token included
    token_ids_vocab: str | None = None  # names the vocabulary of token_ids
    finish_reason: str = "stop"  # "length": cut at the length limit, so no end of turn


def pair_responses(row: dict) -> tuple[Response, Response]:
    def response(side: str) -> Response:
        ids = row.get(f"{side}_token_ids")
        return Response(row[side], tuple(ids) if ids is not None else None, row.get(f"{side}_token_ids_vocab"),
                        row.get(f"{side}_finish_reason") or "stop")

    return response("chosen"), response("rejected")


def decode_prompt(prompt_json: str) -> list[dict] | str:
    return json.loads(prompt_json)
