"""dadpo.pairs, spec v2: every TRL layout normalises to the same rows; prompt formats; the optional
response columns; streaming in chunks (duplicates across chunks, extras unified, row groups); the
sources datasets reads; load_prompts."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
import subprocess
import sys

import datasets
import polars as pl
import pyarrow.parquet as pq
import pytest

from support import REPO, kill_when, write_data_folder, write_datasets, write_json, write_jsonl, write_parquet
from dadpo.atomic import sweep_temp_files
from dadpo.errors import DadpoError
from dadpo.pairs import RESPONSE_COLUMNS, decode_prompt, load_pairs, load_prompts
from dadpo.tokenization import Response, pair_responses

SYSTEM = {"role": "system", "content": "Be terse."}
# (prompt messages, chosen text, rejected text, topic): single turn, a system prompt, several turns
PAIRS = [
    ([{"role": "user", "content": "What is 2+2?"}], "4.", "5.", "math"),
    ([SYSTEM, {"role": "user", "content": "Capital of France?"}], "Paris.", "Lyon.", "geo"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Say hi in French"}], "Bonjour !", "Hola", "lang"),
]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


LAYOUTS = {
    "explicit, string responses": lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r},
    "explicit, message responses": lambda p, c, r: {"prompt": p, "chosen": assistant(c), "rejected": assistant(r)},
    "conversations, no prompt": lambda p, c, r: {"chosen": p + assistant(c), "rejected": p + assistant(r)},
    "conversations + the same prompt": lambda p, c, r: {"prompt": p, "chosen": p + assistant(c),
                                                        "rejected": p + assistant(r)},
    "conversations + how they start": lambda p, c, r: {"prompt": p[:1], "chosen": p + assistant(c),
                                                       "rejected": p + assistant(r)},
    "ultrafeedback_binarized": lambda p, c, r: {"prompt": p[-1]["content"], "chosen": p + assistant(c),
                                                "rejected": p + assistant(r)},
}
FORMATS = {
    "jsonl": lambda folder, rows: write_jsonl(folder / "p.jsonl", rows),
    "json": lambda folder, rows: write_json(folder / "p.json", rows),
    "parquet": lambda folder, rows: write_parquet(folder / "p.parquet", rows),
    "save_to_disk": lambda folder, rows: write_datasets(folder / "saved", rows),
    "load_dataset folder": lambda folder, rows: write_data_folder(folder / "hub_like", {"train": rows}),
}


def rows_in(layout: str) -> list[dict]:
    return [{**LAYOUTS[layout](prompt, chosen, rejected), "topic": topic} for prompt, chosen, rejected, topic in PAIRS]


def raises(path, *fragments, load=load_pairs, **options) -> str:
    with pytest.raises(DadpoError) as caught:
        load(path, **options)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def canonical(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def spec_fingerprint(rows: list[dict]) -> str:
    """The pairs fingerprint as data_specs/pairs.v2.md defines it, computed from expected rows."""
    digest = hashlib.sha256()
    for row in rows:
        line = [row["id"], row["prompt"], row["chosen"], row["rejected"]]
        fields, ids = {}, b""
        for side in ("chosen", "rejected"):
            if row.get(f"{side}_token_ids") is not None:
                fields[f"{side}_token_ids"] = len(row[f"{side}_token_ids"])
                fields[f"{side}_token_ids_vocab"] = row[f"{side}_token_ids_vocab"]
                ids += struct.pack(f"<{len(row[f'{side}_token_ids'])}i", *row[f"{side}_token_ids"])
            if row.get(f"{side}_finish_reason") is not None:
                fields[f"{side}_finish_reason"] = row[f"{side}_finish_reason"]
        digest.update(canonical(line + [fields] if fields else line).encode() + b"\n" + ids)
    return digest.hexdigest()


# ---- layouts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return load_pairs(write_jsonl(tmp_path_factory.mktemp("ref") / "ref.jsonl", rows_in("explicit, string responses")))


def test_the_reference_rows_are_the_pairs(reference):
    frame = reference.read()
    expected_ids = [hashlib.sha256(canonical([p, c, r]).encode()).hexdigest()[:16] for p, c, r, _ in PAIRS]
    assert frame["id"].to_list() == expected_ids
    assert [decode_prompt(p) for p in frame["prompt"]] == [p for p, *_ in PAIRS]
    assert frame["chosen"].to_list() == [c for _, c, _, _ in PAIRS]
    assert frame["rejected"].to_list() == [r for _, _, r, _ in PAIRS]
    rows = [{"id": i, "prompt": canonical(p), "chosen": c, "rejected": r} for i, (p, c, r, _) in zip(expected_ids, PAIRS)]
    assert reference.fingerprint == spec_fingerprint(rows)


@pytest.mark.parametrize("file_format", list(FORMATS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_and_format_gives_the_explicit_rows(tmp_path, datasets_cache, reference, layout, file_format):
    pairs = load_pairs(FORMATS[file_format](tmp_path, rows_in(layout)))
    assert pairs.read().equals(reference.read())
    assert pairs.fingerprint == reference.fingerprint
    assert pairs.extra_columns == ["topic"]


def test_layouts_are_read_as_trl_reads_them(tmp_path):
    """An independent reading of the same rows: TRL's own prompt extraction."""
    maybe_extract_prompt = pytest.importorskip("trl.data_utils").maybe_extract_prompt
    implicit = [{"chosen": "The answer is 4", "rejected": "The answer is 5"}, {"chosen": "x=1;", "rejected": "x=22;"},
                {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green, mostly"}]
    for name, rows in (("conversations", rows_in("conversations, no prompt")),
                       ("ultrafeedback", rows_in("ultrafeedback_binarized")), ("implicit", implicit)):
        frame = load_pairs(write_jsonl(tmp_path / f"{name}.jsonl", rows), prompt_format="raw").read()
        for row, got in zip(rows, frame.iter_rows(named=True), strict=True):
            expected = maybe_extract_prompt({key: row[key] for key in ("prompt", "chosen", "rejected") if key in row})
            assert decode_prompt(got["prompt"]) == expected["prompt"]
            for side in ("chosen", "rejected"):
                text = expected[side] if isinstance(expected[side], str) else expected[side][-1]["content"]
                assert got[side] == text


def test_implicit_prompts_and_the_space_rule(tmp_path):
    rows = [{"chosen": "The answer is 4", "rejected": "The answer is 5"},  # the space goes to the responses
            {"chosen": "x=1", "rejected": "x=22"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    raw, chat = load_pairs(path, prompt_format="raw"), load_pairs(path)
    assert raw.prompt_format == "raw" and chat.prompt_format == "chat"
    assert [decode_prompt(p) for p in raw.read()["prompt"]] == ["The answer is", "x="]
    assert raw.read()["chosen"].to_list() == [" 4", "1"] and raw.read()["rejected"].to_list() == [" 5", "22"]
    assert [decode_prompt(p) for p in chat.read()["prompt"]] == [[{"role": "user", "content": "The answer is"}],
                                                               [{"role": "user", "content": "x="}]]
    # the same pairs with the prompt given: the same rows, under either format
    explicit = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "The answer is", "chosen": " 4", "rejected": " 5"},
                                                  {"prompt": "x=", "chosen": "1", "rejected": "22"}])
    for prompt_format, implicit in (("raw", raw), ("chat", chat)):
        given = load_pairs(explicit, prompt_format=prompt_format)
        assert given.read().equals(implicit.read()) and given.fingerprint == implicit.fingerprint


def test_prompt_format_raw_keeps_string_prompts_as_text(tmp_path):
    rows = [{"prompt": "<|user|>Hi<|assistant|>", "chosen": "Hello", "rejected": "Yo"},
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Yo"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    raw, chat = load_pairs(path, prompt_format="raw").read(), load_pairs(path).read()
    assert raw["prompt"].to_list() == ['"<|user|>Hi<|assistant|>"', '[{"role":"user","content":"Hi"}]']
    assert decode_prompt(raw["prompt"][0]) == "<|user|>Hi<|assistant|>"
    assert decode_prompt(chat["prompt"][0]) == [{"role": "user", "content": "<|user|>Hi<|assistant|>"}]
    assert raw["prompt"][1] == chat["prompt"][1]  # message prompts are the same under both
    assert raw["id"][0] == hashlib.sha256(canonical(["<|user|>Hi<|assistant|>", "Hello", "Yo"]).encode()).hexdigest()[:16]
    assert raw["id"][0] != chat["id"][0] and raw["id"][1] == chat["id"][1]
    raises(path, "prompt format 'text': expected chat or raw", prompt_format="text")


def test_ultrafeedback_style_rows_keep_their_other_columns(tmp_path):
    rows = [{"prompt": p[-1]["content"], "prompt_id": f"pid{i}", "chosen": p + assistant(c), "rejected": p + assistant(r),
             "messages": p + assistant(c), "score_chosen": 8.0, "score_rejected": 3.5}
            for i, (p, c, r, _) in enumerate(PAIRS)]
    pairs = load_pairs(write_parquet(tmp_path / "train_prefs.parquet", rows))
    frame = pairs.read()
    assert pairs.extra_columns == ["prompt_id", "messages", "score_chosen", "score_rejected"]
    assert frame["prompt_id"].to_list() == ["pid0", "pid1", "pid2"]
    assert frame["messages"].to_list() == [row["messages"] for row in rows]
    assert [decode_prompt(p) for p in frame["prompt"]] == [p for p, *_ in PAIRS]
    assert frame["chosen"].to_list() == ["4.", "Paris.", "Bonjour !"]


SECOND = [{"role": "user", "content": "Other question"}]


@pytest.mark.parametrize("row, fragments", [
    ({"chosen": [SYSTEM, *PAIRS[0][0], *assistant("4.")], "rejected": [SYSTEM, *SECOND, *assistant("5.")]},
     ["line 2 (id 'q'): 'chosen' and 'rejected' differ at message 1, before their last assistant turn"]),
    ({"chosen": PAIRS[2][0] + assistant("a"), "rejected": PAIRS[2][0][:1] + assistant("b")},
     ["line 2 (id 'q'): 'chosen' and 'rejected' differ at message 1"]),
    ({"chosen": PAIRS[2][0], "rejected": PAIRS[2][0]},
     ["line 2 (id 'q'): 'chosen' message 2 has role 'user'; expected 'assistant' (a conversation ends with the response)"]),
    ({"prompt": SECOND, "chosen": PAIRS[0][0] + assistant("a"), "rejected": PAIRS[0][0] + assistant("b")},
     ["line 2 (id 'q'): 'prompt' and the conversation in 'chosen' differ at message 0"]),
    ({"prompt": PAIRS[2][0] + assistant("x"), "chosen": PAIRS[2][0] + assistant("a"),
      "rejected": PAIRS[2][0] + assistant("b")}, ["'prompt' and the conversation in 'chosen' differ at message 3"]),
    ({"prompt": "Other question", "chosen": PAIRS[0][0] + assistant("a"), "rejected": PAIRS[0][0] + assistant("b")},
     ["line 2 (id 'q'): 'prompt' is not the last user message of the conversation in 'chosen'"]),
    ({"chosen": assistant("a"), "rejected": assistant("b")},
     ["line 2 (id 'q'): no 'prompt', and the conversations hold nothing before the response"]),
    ({"chosen": "abc", "rejected": "xyz"}, ["line 2 (id 'q'): no 'prompt', and 'chosen' and 'rejected' share no prefix"]),
    ({"chosen": " a", "rejected": " b"}, ["share no prefix"]),  # the shared space goes to the responses
    ({"chosen": "same", "rejected": "same, longer"}, ["no 'prompt', and nothing of 'chosen' is left after the prefix"]),
    ({"chosen": "text", "rejected": PAIRS[0][0] + assistant("b")},
     ["line 2 (id 'q'): 'rejected' holds a conversation of 2 messages but 'chosen' is a str"]),
    ({"chosen": 5, "rejected": "b"}, ["line 2 (id 'q'): 'chosen' must be a string or a list of messages, got int"]),
    ({"chosen": [{"role": "user", "content": "u"}, {"role": "robot", "content": "a"}], "rejected": []},
     ["'chosen' message 1 has unknown role 'robot'"]),
    ({"chosen": PAIRS[0][0] + assistant(" "), "rejected": PAIRS[0][0] + assistant("b")}, ["line 2 (id 'q'): 'chosen' is empty"]),
])
def test_layout_errors_name_the_row_and_the_message(tmp_path, row, fragments):
    first = {"id": "p", "chosen": PAIRS[0][0] + assistant("4."), "rejected": PAIRS[0][0] + assistant("5.")}
    if "prompt" in row:
        first["prompt"] = PAIRS[0][0]
    raises(write_jsonl(tmp_path / "p.jsonl", [first, {"id": "q", **row}]), "p.jsonl", *fragments)


def test_rows_must_agree_on_prompt_and_id(tmp_path):
    explicit, implicit = {"prompt": "p", "chosen": "c", "rejected": "r"}, {"chosen": "Q: a", "rejected": "Q: b"}
    raises(write_jsonl(tmp_path / "a.jsonl", [explicit, implicit]), "a.jsonl line 2: 'prompt' is missing")
    raises(write_jsonl(tmp_path / "b.jsonl", [implicit, explicit]),
           "b.jsonl line 2: has 'prompt' but line 1 has none (give every row 'prompt', or none)")
    raises(write_jsonl(tmp_path / "c.jsonl", [{"id": "x", **explicit}, implicit]),
           "c.jsonl line 2: 'id' is missing (give every row an id, or drop the column)")
    raises(write_jsonl(tmp_path / "d.jsonl", [implicit, {"id": "x", **explicit}]), "d.jsonl line 2: has 'id' but line 1")


def test_a_misspelt_prompt_column_is_not_taken_for_an_extra(tmp_path):
    rows = [{"Prompt": "p", "chosen": "Q: a", "rejected": "Q: b"}]
    raises(write_jsonl(tmp_path / "p.jsonl", rows), "missing column 'prompt'", "did you mean 'Prompt' for 'prompt'?")
    # a prompt_id column beside conversations is an extra, not a misspelt prompt
    rows = [{"prompt_id": "x", "chosen": PAIRS[0][0] + assistant("a"), "rejected": PAIRS[0][0] + assistant("b")}]
    assert load_pairs(write_jsonl(tmp_path / "q.jsonl", rows)).extra_columns == ["prompt_id"]


# ---- response columns ---------------------------------------------------------------------------

BASE = [{"id": "a", "prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
        {"id": "b", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}]
GENERATED = [
    {**BASE[0], "chosen_token_ids": [19, 13, 2], "chosen_token_ids_vocab": "sha256:t", "chosen_finish_reason": "stop",
     "rejected_token_ids": [20, 13], "rejected_token_ids_vocab": "sha256:s", "rejected_finish_reason": "length"},
    {**BASE[1], "chosen_token_ids": None, "chosen_token_ids_vocab": None, "chosen_finish_reason": "stop",
     "rejected_token_ids": [2**31 - 1, 0], "rejected_token_ids_vocab": "sha256:s", "rejected_finish_reason": None},
]


@pytest.mark.parametrize("file_format", ["jsonl", "parquet", "save_to_disk"])
def test_response_columns_are_kept_and_fingerprinted(tmp_path, file_format):
    pairs = load_pairs(FORMATS[file_format](tmp_path, GENERATED))
    frame = pairs.read()
    assert frame.columns == ["id", "prompt", "chosen", "rejected", *RESPONSE_COLUMNS] and pairs.extra_columns == []
    assert frame.schema["chosen_token_ids"] == pl.List(pl.Int32)
    for column in RESPONSE_COLUMNS:
        assert frame[column].to_list() == [row[column] for row in GENERATED]
    expected = [{**row, "prompt": canonical([{"role": "user", "content": row["prompt"]}])} for row in GENERATED]
    assert pairs.fingerprint == spec_fingerprint(expected)
    plain = load_pairs(write_jsonl(tmp_path / "plain.jsonl", BASE))
    assert pairs.fingerprint != plain.fingerprint and plain.fingerprint == spec_fingerprint(
        [{**row, "prompt": canonical([{"role": "user", "content": row["prompt"]}])} for row in BASE])
    chosen, rejected = pair_responses(next(frame.iter_rows(named=True)))
    assert chosen == Response("4.", (19, 13, 2), "sha256:t", "stop")
    assert rejected == Response("5.", (20, 13), "sha256:s", "length")
    second = pair_responses(frame.row(1, named=True))
    assert second == (Response("Paris."), Response("Lyon.", (2**31 - 1, 0), "sha256:s", "stop"))


@pytest.mark.parametrize("change, fragment", [
    ({"chosen_token_ids": [1, -1]}, "'chosen_token_ids' item 1 is -1, not a token id (an integer from 0 to 2147483647)"),
    ({"chosen_token_ids": [2**31]}, "'chosen_token_ids' item 0 is 2147483648, not a token id"),
    ({"chosen_token_ids": [1, True]}, "'chosen_token_ids' item 1 is True, not a token id"),
    ({"chosen_token_ids": [1.5]}, "'chosen_token_ids' item 0 is 1.5, not a token id"),
    ({"chosen_token_ids": ["7"]}, "'chosen_token_ids' item 0 is '7', not a token id"),
    ({"chosen_token_ids": []}, "'chosen_token_ids' is empty"),
    ({"chosen_token_ids": "1 2"}, "'chosen_token_ids' must be a list of token ids, got str"),
    ({"chosen_token_ids": {"ids": [1]}}, "'chosen_token_ids' must be a list of token ids, got dict"),
    ({"rejected_token_ids": [1, 2**40]}, "'rejected_token_ids' item 1 is 1099511627776, not a token id"),
    ({"chosen_token_ids_vocab": None}, "'chosen_token_ids' and 'chosen_token_ids_vocab' go together: give both or neither"),
    ({"chosen_token_ids": None}, "'chosen_token_ids' and 'chosen_token_ids_vocab' go together"),
    ({"chosen_token_ids_vocab": " "}, "'chosen_token_ids_vocab' must be a non-empty string, got ' '"),
    ({"chosen_token_ids_vocab": 3}, "'chosen_token_ids_vocab' must be a non-empty string, got 3"),
    ({"rejected_finish_reason": "eos"}, "'rejected_finish_reason' must be stop or length (or null), got 'eos'"),
])
def test_bad_response_columns_name_the_row_and_column(tmp_path, change, fragment):
    rows = [GENERATED[1], {**GENERATED[0], **change}]
    raises(write_jsonl(tmp_path / "p.jsonl", rows), f"p.jsonl line 2 (id 'a'): {fragment}")


def test_bad_response_columns_in_parquet(tmp_path):
    ok = {**BASE[0], "chosen_token_ids": [1, 2], "chosen_token_ids_vocab": "v"}
    bad = {**BASE[1], "chosen_token_ids": [3, -4], "chosen_token_ids_vocab": "v"}
    raises(write_parquet(tmp_path / "p.parquet", [ok, bad]), "p.parquet row 1 (id 'b'): 'chosen_token_ids' item 1 is -4")
    text_ids = [{**row, "chosen_token_ids": ["1"]} for row in (ok, bad)]
    raises(write_parquet(tmp_path / "s.parquet", text_ids), "s.parquet row 0 (id 'a'): 'chosen_token_ids' item 0 is '1'")


def test_the_first_bad_row_is_reported_whatever_its_column(tmp_path):
    bad_tokens = {**GENERATED[0], "chosen_token_ids": [-1]}
    bad_prompt = {**GENERATED[1], "prompt": 5}
    raises(write_jsonl(tmp_path / "a.jsonl", [bad_prompt, bad_tokens]), "line 1 (id 'b'): 'prompt' must be")
    raises(write_jsonl(tmp_path / "b.jsonl", [bad_tokens, bad_prompt]), "line 1 (id 'a'): 'chosen_token_ids' item 0")


# ---- streaming ----------------------------------------------------------------------------------


def many_rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"yes {i}",
             "rejected": f"no {i}", "chosen_token_ids": list(range(i % 5 + 1)), "chosen_token_ids_vocab": "v",
             "rejected_finish_reason": "length" if i % 3 else None, "n": i} for i in range(n)]


@pytest.mark.parametrize("file_format", ["jsonl", "json", "parquet"])
def test_chunks_give_the_rows_of_one_chunk(tmp_path, file_format):
    path = FORMATS[file_format](tmp_path, many_rows(50))
    whole, chunked = load_pairs(path), load_pairs(path, chunk_rows=4)
    assert chunked.read().equals(whole.read()) and chunked.fingerprint == whole.fingerprint and len(chunked) == 50
    assert pq.ParquetFile(chunked.file).num_row_groups == 13 and pq.ParquetFile(whole.file).num_row_groups == 1
    frame = whole.read()
    for offset, length in ((0, 4), (3, 6), (10, 25), (48, 10), (50, 3)):
        assert chunked.slice(offset, length).equals(frame.slice(offset, length))
    assert chunked.slice(5, 2, columns=["id", "n"]).to_dicts() == [{"id": "r5", "n": 5}, {"id": "r6", "n": 6}]


def test_duplicates_are_found_across_chunks(tmp_path):
    rows = many_rows(12)
    rows[8] = {**rows[8], "id": "r1"}
    rows[10] = {**rows[10], "id": "r3"}
    raises(write_jsonl(tmp_path / "a.jsonl", rows), "a.jsonl: duplicate id 'r1' (lines 2 and 9)", chunk_rows=3)
    rows[7] = {**rows[7], "id": "r5"}  # the first row (in order) that repeats an id is reported
    raises(write_parquet(tmp_path / "b.parquet", rows), "duplicate id 'r5' (rows 5 and 7)", chunk_rows=3)
    digest = [{k: v for k, v in row.items() if k != "id"} for row in many_rows(7)]
    raises(write_jsonl(tmp_path / "c.jsonl", digest + digest[2:3]), "(lines 3 and 8) (identical prompt, chosen and rejected)",
           chunk_rows=2)
    prompts = [{"prompt": f"q{i % 5}"} for i in range(7)]
    raises(write_jsonl(tmp_path / "d.jsonl", prompts), "(lines 1 and 6) (the same prompt twice", load=load_prompts,
           chunk_rows=2)


def test_extra_columns_are_unified_across_chunks(tmp_path):
    rows = [{**BASE[i % 2], "id": f"r{i}"} for i in range(6)]
    extras = [{"score": 1, "meta": {"a": 1}, "mixed": 1, "tags": []},
              {"score": 2, "meta": {"a": 2}, "mixed": 2.5, "tags": ["x"]},
              {"score": 2.5, "meta": {"b": "x"}, "mixed": "text", "late": True},
              {"score": None, "mixed": None},
              {"score": 4, "meta": None, "mixed": [1]},
              {"score": 5, "meta": {"a": 5, "b": "y"}, "mixed": {"k": 1}}]
    path = write_jsonl(tmp_path / "p.jsonl", [{**row, **extra} for row, extra in zip(rows, extras)])
    whole, chunked = load_pairs(path), load_pairs(path, chunk_rows=2)
    assert chunked.read().equals(whole.read())
    assert chunked.extra_columns == whole.extra_columns == ["score", "meta", "mixed", "tags", "late"]
    frame = chunked.read()
    assert frame["score"].dtype == pl.Float64 and frame["score"].to_list() == [1.0, 2.0, 2.5, None, 4.0, 5.0]
    assert frame["meta"].to_list() == [{"a": 1, "b": None}, {"a": 2, "b": None}, {"a": None, "b": "x"}, None, None,
                                       {"a": 5, "b": "y"}]
    assert frame["mixed"].to_list() == ["1", "2.5", '"text"', None, "[1]", '{"k":1}']  # no one type: JSON text
    assert frame["tags"].to_list() == [[], ["x"], None, None, None, None]
    assert frame["late"].to_list() == [None, None, True, None, None, None]


def test_the_normalised_file_goes_to_workdir_whole_or_not_at_all(tmp_path):
    work = tmp_path / "work"
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", many_rows(9)), workdir=work, chunk_rows=2)
    assert pairs.file == work / "pairs.parquet" and sorted(os.listdir(work)) == ["pairs.parquet"]
    prompts = load_prompts(tmp_path / "p.jsonl", workdir=work)
    assert prompts.file == work / "prompts.parquet" and sorted(os.listdir(work)) == ["pairs.parquet", "prompts.parquet"]
    failed = tmp_path / "failed"
    bad = many_rows(9)
    bad[7]["chosen"] = ""
    raises(write_jsonl(tmp_path / "bad.jsonl", bad), "line 8 (id 'r7'): 'chosen' is empty", workdir=failed, chunk_rows=2)
    assert os.listdir(failed) == []


def test_a_killed_load_leaves_only_temporary_files_that_are_swept(tmp_path):
    source, work = write_jsonl(tmp_path / "p.jsonl", many_rows(4000)), tmp_path / "work"
    code = f"from dadpo.pairs import load_pairs\nload_pairs({str(source)!r}, workdir={str(work)!r}, chunk_rows=50)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert kill_when(process, lambda: len(list(work.glob(".pairs.parquet.part*.tmp"))) >= 3)
    assert not (work / "pairs.parquet").exists()
    assert sweep_temp_files(work) >= 3 and os.listdir(work) == []
    assert len(load_pairs(source, workdir=work, chunk_rows=50)) == 4000 and os.listdir(work) == ["pairs.parquet"]


def test_without_workdir_the_file_lives_as_long_as_the_object(tmp_path):
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", BASE))
    folder = pairs.file.parent
    assert pairs.file.exists() and folder != tmp_path
    del pairs
    gc.collect()
    assert not folder.exists()


# ---- sources ------------------------------------------------------------------------------------


def test_splits_of_a_data_folder_and_of_a_saved_dataset_dict(tmp_path, datasets_cache):
    train, test = rows_in("conversations, no prompt"), rows_in("conversations, no prompt")[:2]
    folder = write_data_folder(tmp_path / "hub_like", {"train": train, "test": test})
    assert len(load_pairs(folder)) == 3 and len(load_pairs(folder, split="train")) == 3
    assert load_pairs(folder, split="test").read()["chosen"].to_list() == ["4.", "Paris."]
    raises(folder, "hub_like: not a datasets.save_to_disk folder, and datasets.load_dataset could not load it",
           "validation", split="validation")
    saved = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(saved))
    assert len(load_pairs(saved)) == 3 and len(load_pairs(saved, split="test")) == 2
    raises(saved, "dd: a DatasetDict with splits train, test and no 'dev' split", split="dev")
    raises(write_jsonl(tmp_path / "p.jsonl", train), "p.jsonl: a single file holds one split, 'train'", split="test")
    assert len(load_pairs(tmp_path / "p.jsonl", split="train")) == 3
    raises(write_datasets(tmp_path / "one", train), "one: a saved Dataset holds one split", split="test")


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_that_cannot_be_loaded_is_one_line(tmp_path, offline):
    """Offline, or with no network (the client retries for ~25 s), or with a network and no such dataset."""
    code = ("from dadpo.errors import DadpoError\nfrom dadpo.pairs import load_pairs\n"
            "try:\n    load_pairs('someone/no-such-pairs')\nexcept DadpoError as e:\n    print('error:', e)\n")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1 and not result.stderr.strip(), result.stdout + result.stderr
    assert lines[0].startswith("error: someone/no-such-pairs: no such file or folder, and datasets.load_dataset "
                               "could not load it ("), lines[0]


# ---- prompts ------------------------------------------------------------------------------------


def test_prompts_from_every_layout(tmp_path, datasets_cache):
    expected = [canonical(p) for p, *_ in PAIRS]
    expected_ids = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in expected]
    for layout in LAYOUTS:
        prompts = load_prompts(write_parquet(tmp_path / "p.parquet", rows_in(layout)))
        frame = prompts.read()
        assert frame.columns == ["id", "prompt", "topic"], layout
        assert frame["prompt"].to_list() == expected and frame["id"].to_list() == expected_ids, layout
        digest = hashlib.sha256()
        for row_id, prompt in zip(expected_ids, expected):
            digest.update(canonical([row_id, prompt]).encode() + b"\n")
        assert prompts.fingerprint == digest.hexdigest()
    generated = load_prompts(write_jsonl(tmp_path / "g.jsonl", GENERATED))
    assert generated.read().columns == ["id", "prompt"]  # responses and their columns stay behind
    implicit = load_prompts(write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Q: a", "rejected": "Q: b"}]), prompt_format="raw")
    assert decode_prompt(implicit.read()["prompt"][0]) == "Q:"
