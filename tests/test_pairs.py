"""dadpo.pairs: every format loads to the same normalized pairs; every bad input is one clear line.
(The v2 layouts, response columns and streaming: test_pairs_layouts.py.)"""

from __future__ import annotations

import json

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support import write_datasets, write_json, write_jsonl, write_parquet
from dadpo.errors import DadpoError
from dadpo.pairs import RESPONSE_COLUMNS, Pairs, decode_prompt, load_pairs

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5.", "topic": "math"},
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
        "topic": "geo",
    },
    {"prompt": "Say hi in French", "chosen": "Bonjour !", "rejected": "Hola", "topic": "lang"},
]


# Parquet and datasets need one type per column: messages everywhere (TRL conversational).
def as_conversational(rows):
    def messages(value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return [
        {
            **row,
            "prompt": messages(row["prompt"], "user"),
            "chosen": messages(row["chosen"], "assistant"),
            "rejected": messages(row["rejected"], "assistant"),
        }
        for row in rows
    ]


def raises(path, *fragments) -> str:
    with pytest.raises(DadpoError) as caught:
        load_pairs(path)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---- what loads -------------------------------------------------------------------------------


def test_jsonl_normalizes_string_and_message_forms(tmp_path):
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", ROWS))
    assert isinstance(pairs, Pairs) and len(pairs) == 3 and pairs.num_rows == 3
    assert pairs.source == str(tmp_path / "pairs.jsonl")
    frame = pairs.read()
    assert frame.columns == ["id", "prompt", "chosen", "rejected", *RESPONSE_COLUMNS, "topic"]
    assert frame.select(RESPONSE_COLUMNS).null_count().row(0) == (3,) * 6  # v1 rows: no response columns
    assert pairs.extra_columns == ["topic"]
    assert frame.schema["id"] == pl.Utf8
    assert decode_prompt(frame["prompt"][0]) == [{"role": "user", "content": "What is 2+2?"}]
    assert frame["prompt"][0] == '[{"role":"user","content":"What is 2+2?"}]'
    assert decode_prompt(frame["prompt"][1]) == ROWS[1]["prompt"]
    assert frame["chosen"].to_list() == ["4.", "Paris.", "Bonjour !"]
    assert frame["rejected"].to_list() == ["5.", "Lyon.", "Hola"]
    assert frame["topic"].to_list() == ["math", "geo", "lang"]


@pytest.mark.parametrize(
    "name, writer",
    [("p.jsonl", write_jsonl), ("p.json", write_json), ("p.parquet", write_parquet), ("p_ds", write_datasets)],
)
def test_every_format_gives_the_same_frame_and_fingerprint(tmp_path, name, writer):
    reference = load_pairs(write_jsonl(tmp_path / "reference.jsonl", ROWS))
    pairs = load_pairs(writer(tmp_path / name, as_conversational(ROWS)))
    assert pairs.read().equals(reference.read())
    assert pairs.fingerprint == reference.fingerprint


def test_digest_ids_are_stable_and_follow_content(tmp_path):
    first = load_pairs(write_jsonl(tmp_path / "a.jsonl", ROWS))
    again = load_pairs(write_jsonl(tmp_path / "b.jsonl", ROWS))
    ids = first.read()["id"].to_list()
    assert ids == again.read()["id"].to_list()
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == 3
    changed = load_pairs(write_jsonl(tmp_path / "c.jsonl", [{**ROWS[0], "rejected": "6."}] + ROWS[1:]))
    changed_ids = changed.read()["id"].to_list()
    assert changed_ids[0] != ids[0] and changed_ids[1:] == ids[1:]


def test_given_ids_are_kept_and_ints_become_strings(tmp_path):
    rows = [{"id": "q1", **ROWS[0]}, {"id": 7, **ROWS[2]}]
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert pairs.read()["id"].to_list() == ["q1", "7"]
    assert pairs.read().columns[:4] == ["id", "prompt", "chosen", "rejected"]
    assert pairs.extra_columns == ["topic"]


def test_extra_columns_travel_with_their_types(tmp_path):
    rows = [
        {**ROWS[0], "score": 1, "meta": {"a": 1}},
        {**ROWS[2], "score": 2.5, "meta": {"b": "x"}, "mixed": "text"},
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", [{**rows[0], "mixed": 3}, rows[1]]))
    assert pairs.extra_columns == ["topic", "score", "meta", "mixed"]
    frame = pairs.read()
    assert frame["score"].to_list() == [1.0, 2.5]
    assert frame["meta"].to_list() == [{"a": 1, "b": None}, {"a": None, "b": "x"}]
    assert frame["mixed"].to_list() == ["3", '"text"']  # no one type holds both: JSON text
    parquet = load_pairs(write_parquet(tmp_path / "p.parquet", as_conversational(rows[:1]))).read()
    assert parquet["score"].dtype == pl.Int64 and parquet["meta"].to_list() == [{"a": 1}]


def test_fingerprint_changes_when_one_response_changes(tmp_path):
    rows = [{"id": f"r{i}", **row} for i, row in enumerate(ROWS)]
    base = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows))
    edited = load_pairs(write_jsonl(tmp_path / "b.jsonl", rows[:2] + [{**rows[2], "chosen": "Salut !"}]))
    assert base.read()["id"].to_list() == edited.read()["id"].to_list()
    assert base.fingerprint != edited.fingerprint
    reordered = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows[::-1]))
    assert reordered.fingerprint != base.fingerprint


def test_blank_lines_and_byte_order_mark_are_not_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n\n  \n" + json.dumps(ROWS[2]).encode())
    assert len(load_pairs(path)) == 2


def test_datasets_dict_uses_its_train_split(tmp_path):
    ds = datasets.Dataset.from_list(as_conversational(ROWS))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(tmp_path / "dd")) == 3


# ---- what is refused --------------------------------------------------------------------------


def test_missing_column_suggests_the_close_name(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "reject": "r"}]
    raises(
        write_jsonl(tmp_path / "pairs.jsonl", rows),
        "pairs.jsonl: missing column 'rejected' (found: prompt, chosen, reject)",
        "did you mean 'reject' for 'rejected'?",
        "expected chosen, rejected [, prompt, id]",
    )
    misnamed = write_parquet(tmp_path / "p.parquet", [{"Prompt": "p", "chosen": "c"}])
    raises(misnamed, "p.parquet: missing columns 'prompt', 'rejected'", "'Prompt' for 'prompt'")


def test_jsonl_syntax_and_encoding_errors_name_the_line(tmp_path):
    good = json.dumps(ROWS[0])
    truncated = tmp_path / "pairs.jsonl"
    truncated.write_text(good + "\n" + good + "\n" + good[:30], encoding="utf-8")
    raises(truncated, "pairs.jsonl line 3: not valid JSON (Unterminated string", "col 28", "truncated")
    middle = tmp_path / "middle.jsonl"
    middle.write_text(good + "\n{oops}\n" + good + "\n", encoding="utf-8")
    message = raises(middle, "middle.jsonl line 2: not valid JSON (Expecting property name")
    assert "truncated" not in message
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(good.encode() + b"\n" + good.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    raises(bad_bytes, "bytes.jsonl line 3: not valid UTF-8 (byte 0xff at offset 12)")
    raises(write_jsonl(tmp_path / "list.jsonl", [ROWS[0], [1, 2]]), "list.jsonl line 2: expected a JSON object, got list")


def test_json_errors(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", ROWS[:2])
    raises(lines, "lines.json line 2: not valid JSON (Extra data", "name it .jsonl")
    raises(write_json(tmp_path / "obj.json", {"data": ROWS}), "obj.json: expected a top-level list of objects, got dict")
    raises(write_json(tmp_path / "row.json", [ROWS[0], "x"]), "row.json row 1: expected a JSON object, got str")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[\n{"prompt": "\xfe"}]')
    raises(bad, "bad.json line 2: not valid UTF-8 (byte 0xfe at offset 14)")


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"chosen": ""}, ["row 1 (id 'b'): 'chosen' is empty"]),
        ({"chosen": " \n\t"}, ["row 1 (id 'b'): 'chosen' is empty"]),
        ({"rejected": None}, ["row 1 (id 'b'): 'rejected' is null"]),
        ({"prompt": 5}, ["row 1 (id 'b'): 'prompt' must be a string or a list of {role, content} messages, got int"]),
        ({"prompt": ""}, ["row 1 (id 'b'): 'prompt' is empty"]),
        ({"prompt": []}, ["row 1 (id 'b'): 'prompt' is empty"]),
        ({"prompt": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
         ["row 1 (id 'b'): 'prompt' message 1 has unknown role 'robot' (allowed: system, user, assistant, tool)"]),
        ({"prompt": [{"role": "user", "content": ["hi"]}]},
         ["row 1 (id 'b'): 'prompt' message 0 'content' must be a string, got list"]),
        ({"prompt": [{"role": "user"}]}, ["'prompt' message 0 'content' must be a string, got null"]),
        ({"prompt": " \n"}, ["row 1 (id 'b'): 'prompt' is empty"]),
        ({"prompt": [{"role": "user", "content": " "}]}, ["row 1 (id 'b'): 'prompt' is empty"]),
        ({"prompt": [{"content": "hi"}]}, ["'prompt' message 0 has no role"]),
        ({"prompt": ["hi"]}, ["'prompt' message 0 must be a {role, content} object, got str"]),
        # v2: a list of several messages is a whole conversation, which the other response must be too
        ({"chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
         ["row 1 (id 'b'): 'chosen' holds a conversation of 2 messages but 'rejected' is a str"]),
        ({"chosen": []}, ["row 1 (id 'b'): 'chosen' must be a string or a one-message assistant list, got a list of 0 messages"]),
        ({"rejected": [{"role": "user", "content": "a"}]}, ["'rejected' message has role 'user'; expected 'assistant'"]),
        ({"rejected": [{"role": "assistant", "content": 3}]}, ["'rejected' message 'content' must be a string, got int"]),
        ({"rejected": [{"role": "assistant", "content": "  "}]}, ["'rejected' is empty"]),
        ({"chosen": {"text": "a"}}, ["'chosen' must be a string or a one-message assistant list, got dict"]),
        ({"id": 1.5}, ["row 1: 'id' must be a string or an integer, got float"]),
        ({"id": None}, ["row 1: 'id' is null"]),
        ({"id": " "}, ["row 1: 'id' is empty"]),
        ({"id": True}, ["row 1: 'id' must be a string or an integer, got bool"]),
        ({"id": "a"}, ["duplicate id 'a' (rows 0 and 1)"]),
    ],
)
def test_bad_rows_name_the_file_row_id_and_column(tmp_path, change, fragments):
    rows = [{"id": "a", **ROWS[0]}, {"id": "b", **ROWS[2], **change}]
    raises(write_json(tmp_path / "pairs.json", rows), "pairs.json", *fragments)
    # JSONL numbers rows by line (1-based): the second row sits on line 2.
    jsonl_fragments = [f.replace("row 1", "line 2").replace("rows 0 and 1", "lines 1 and 2") for f in fragments]
    raises(write_jsonl(tmp_path / "pairs.jsonl", rows), "pairs.jsonl", *jsonl_fragments)


def test_bad_rows_in_parquet_and_datasets(tmp_path):
    rows = [{"id": "abc", "prompt": "p", "chosen": "c", "rejected": "r"}] * 4 + [
        {"id": "x", "prompt": "p", "chosen": "", "rejected": None}
    ]
    rows = [{**row, "id": f"{row['id']}{i}"} for i, row in enumerate(rows)]
    raises(write_parquet(tmp_path / "pairs.parquet", rows), "pairs.parquet row 4 (id 'x4'): 'chosen' is empty")
    raises(write_datasets(tmp_path / "pairs_ds", rows), "pairs_ds row 4 (id 'x4'): 'chosen' is empty")


def test_duplicate_content_without_ids(tmp_path):
    rows = [ROWS[0], ROWS[1], ROWS[0]]
    raises(write_jsonl(tmp_path / "pairs.jsonl", rows), "pairs.jsonl: duplicate id '", "(lines 1 and 3)", "identical")
    raises(write_parquet(tmp_path / "p.parquet", as_conversational(rows)), "p.parquet: duplicate id", "(rows 0 and 2)")


def test_a_row_lacking_a_key_in_jsonl(tmp_path):
    rows = [ROWS[0], {"prompt": "p", "chosen": "c"}]
    raises(write_jsonl(tmp_path / "pairs.jsonl", rows), "pairs.jsonl line 2: 'rejected' is missing")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    raises(tmp_path / "empty.jsonl", "empty.jsonl: the file is empty")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    raises(tmp_path / "blank.jsonl", "blank.jsonl: has no rows")
    (tmp_path / "empty.json").write_bytes(b"")
    raises(tmp_path / "empty.json", "empty.json: the file is empty")
    raises(write_json(tmp_path / "none.json", []), "none.json: has no rows")
    (tmp_path / "empty.parquet").write_bytes(b"")
    raises(tmp_path / "empty.parquet", "empty.parquet: the file is empty")
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "none.parquet")
    raises(tmp_path / "none.parquet", "none.parquet: has no rows")


def test_unreadable_sources(tmp_path):
    raises(tmp_path / "missing.jsonl", "missing.jsonl: no such file")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    raises(tmp_path / "pairs.csv", "pairs.csv: unsupported format; use .parquet, .jsonl or .json, a datasets")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    raises(tmp_path / "junk.parquet", "junk.parquet: not a readable Parquet file")
    (tmp_path / "plain_folder").mkdir()
    raises(tmp_path / "plain_folder", "plain_folder: not a datasets.save_to_disk folder, and datasets.load_dataset "
           "could not load it (EmptyDatasetError", "doesn't contain any data files")
    ds = datasets.Dataset.from_list(as_conversational(ROWS))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    raises(tmp_path / "no_train", "no_train: a DatasetDict with splits test and no 'train' split")


# ---- the code and the published schema (data_specs/pairs.v1.schema.json) agree ---------------

USER, ASSISTANT = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
TOKENS = {"chosen_token_ids": [5, 0, 2], "chosen_token_ids_vocab": "v1", "chosen_finish_reason": "length"}
SCHEMA_CASES = [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, True),
    ({"id": 3, "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
      "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r", "extra": 1}, True),
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "b"}]}, True),
    ({"prompt": "u", "chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "b"}]}, True),
    ({"chosen": "Q: x? A: yes", "rejected": "Q: x? A: no"}, True),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "rejected_finish_reason": None}, True),
    ({"prompt": "p", "chosen": "c"}, False),
    ({"prompt": 42, "chosen": "c", "rejected": "r"}, False),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, False),
    ({"prompt": [{"role": "user", "content": " "}], "chosen": "c", "rejected": "r"}, False),
    ({"prompt": [{"role": "robot", "content": "u"}], "chosen": "c", "rejected": "r"}, False),
    ({"prompt": [{"role": "user", "content": ["x"]}], "chosen": "c", "rejected": "r"}, False),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}, False),
    ({"prompt": "p", "chosen": " ", "rejected": "r"}, False),
    ({"id": " ", "prompt": "p", "chosen": "c", "rejected": "r"}, False),
    ({"id": True, "prompt": "p", "chosen": "c", "rejected": "r"}, False),
    ({"chosen": [USER, USER], "rejected": [USER, ASSISTANT]}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids": [1, -1]}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids": [1, True]}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids": [1, 2**31]}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids": []}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids": "1 2"}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_token_ids_vocab": None}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "rejected_token_ids_vocab": "v1"}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r", **TOKENS, "chosen_finish_reason": "eos"}, False),
]


@pytest.mark.parametrize("row,valid", SCHEMA_CASES)
def test_loader_and_schema_agree(tmp_path, row, valid):
    from dadpo.specs import load_spec, schema_errors

    assert (schema_errors(row, load_spec("pairs.v2.schema.json")) == []) is valid
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    if valid:
        assert len(load_pairs(path)) == 1
    else:
        with pytest.raises(DadpoError):
            load_pairs(path)


def test_validate_json_is_one_line_naming_the_first_error():
    from dadpo.specs import validate_json

    row = {"prompt": 5, "chosen": "c", "rejected": "r", "chosen_token_ids": [1, -1]}
    with pytest.raises(DadpoError) as caught:
        validate_json(row, "pairs.v2.schema.json", "row 3")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("row 3: does not follow data_specs/pairs.v2.schema.json: $")
    assert message.endswith("(and 2 more)"), message  # the prompt, the negative id, the missing vocabulary
    with pytest.raises(DadpoError) as caught:  # the offending value is quoted, but not at any length
        validate_json({"prompt": ["x" * 5000], "chosen": "c", "rejected": "r"}, "pairs.v2.schema.json", "row 4")
    assert len(str(caught.value)) < 400
    validate_json({"chosen": "c", "rejected": "r"}, "pairs.v2.schema.json", "row 5")
