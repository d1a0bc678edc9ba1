"""Property-based tests (hypothesis) of what reads user data: the pairs reader (every layout, with and
without ids, JSONL, JSON and Parquet), the cache's manifest and shard readers, and the prompt renderer.
Every generated input gives a result or one DadpoError line, never another exception.

The inputs are derived from a fixed seed (derandomize): every run tries the same ones, and the
README's "Reliability" section gives their count (the sum of the max_examples below).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st
from transformers import AutoTokenizer

from dadpo.cache import open_cache
from dadpo.cache.manifest import read_manifest
from dadpo.errors import DadpoError
from dadpo.pairs import NormalizedFile, decode_prompt, load_pairs, load_prompts
from dadpo.pairs_rows import ALLOWED_ROLES, FINISH_REASONS
from dadpo.tiny import TEMPLATES
from dadpo.tokenization import ModelTokenizer, Response

PAIRS_EXAMPLES = 700
MANIFEST_EXAMPLES = 600
SHARD_EXAMPLES = 500
RENDER_EXAMPLES = 1400


def checked(**limits):
    """hypothesis settings: no time limit per input (the machine is shared), the same inputs on every
    run, no example database."""
    return settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **limits)


def outcome(call):
    """call()'s result, or the DadpoError it raised, which must be one non-empty line; any other
    exception fails the test (hypothesis then shrinks the input and prints it)."""
    try:
        return call()
    except DadpoError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        return exc


# ---------------------------------------------------------------- generated values

# Unicode without lone surrogates (which no UTF-8 file can hold), often empty or blank, plus text
# that means something to templates and tokenizers.
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["", " ", "\n\t", "héllo wörld", "日本語", "rocket🚀", "<s>", "</s>", "<|im_start|>",
                     "<|im_end|>", "{{ raise_exception('x') }}", "\x00", "\u200b", "a" * 300]),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
ROLE = st.one_of(st.sampled_from(ALLOWED_ROLES), st.sampled_from(["", "tool", "bot", "USER", "function"]), TEXT, JSON)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(ALLOWED_ROLES), "content": TEXT})
ODD_MESSAGE = st.one_of(
    MESSAGE,
    st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, JSON)}),
    st.fixed_dictionaries({}, optional={"role": ROLE, "content": JSON, "name": TEXT}),
    JSON,
)


def assistant(text) -> list[dict]:
    return [{"role": "assistant", "content": text}]


WORDS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).map(lambda text: "x" + text)


LAYOUTS = ["explicit", "explicit messages", "conversations", "conversations + prompt", "ultrafeedback", "implicit",
           "anything"]


@st.composite
def pair_rows(draw, with_id: bool, clean: bool, layout: str | None) -> dict:
    """One row in one of the layouts pairs.py accepts, then (unless clean) perhaps damaged: a field
    of another type, a key left out, odd messages; extra columns of any JSON value (`{}` included),
    response columns."""
    text = WORDS if clean else TEXT
    message = st.fixed_dictionaries({"role": st.sampled_from(ALLOWED_ROLES), "content": text})
    messages = draw(st.lists(message if clean or draw(st.integers(0, 3)) else ODD_MESSAGE, min_size=1, max_size=3))
    if clean and all(m["role"] != "user" for m in messages):
        messages.append({"role": "user", "content": draw(WORDS)})
    chosen, rejected = draw(text), draw(text)
    layout = layout or draw(st.sampled_from(LAYOUTS))
    if layout == "explicit":
        row = {"prompt": draw(st.one_of(TEXT, st.just(messages))), "chosen": chosen, "rejected": rejected}
    elif layout == "explicit messages":
        row = {"prompt": messages, "chosen": assistant(chosen), "rejected": assistant(rejected)}
    elif layout == "conversations":
        row = {"chosen": messages + assistant(chosen), "rejected": messages + assistant(rejected)}
    elif layout == "conversations + prompt":
        row = {"prompt": messages[: draw(st.integers(0, len(messages)))], "chosen": messages + assistant(chosen),
               "rejected": messages + assistant(rejected)}
    elif layout == "ultrafeedback":
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users and clean else messages[-1].get("content") if isinstance(messages[-1], dict) else None
        row = {"prompt": last, "chosen": messages + assistant(chosen), "rejected": messages + assistant(rejected)}
    elif layout == "implicit":
        shared = draw(text) + " "
        row = {"chosen": shared + "a" + chosen, "rejected": shared + "b" + rejected}
    elif clean:
        row = {"prompt": draw(WORDS), "chosen": chosen, "rejected": rejected}
    else:
        row = draw(st.dictionaries(st.one_of(st.sampled_from(["prompt", "chosen", "rejected", "id"]), TEXT), JSON,
                                   max_size=4))
    if row and not clean and draw(st.integers(0, 2)) == 0:  # one field of another type
        row[draw(st.sampled_from(sorted(row)))] = draw(JSON)
    if row and not clean and draw(st.integers(0, 5)) == 0:  # a column left out
        del row[draw(st.sampled_from(sorted(row)))]
    if with_id and (clean or draw(st.integers(0, 19))):
        row["id"] = draw(st.one_of(st.integers(0, 10**9).map(str), st.integers(-2**40, 2**40), WORDS) if clean else
                         st.one_of(st.integers(0, 10**9).map(str), st.integers(-2**40, 2**40), TEXT, JSON))
    if draw(st.integers(0, 3)) == 0:  # the response columns generate writes
        side = draw(st.sampled_from(["chosen", "rejected"]))
        if clean:
            row[f"{side}_token_ids"] = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4))
            row[f"{side}_token_ids_vocab"] = "0" * 64
            row[f"{side}_finish_reason"] = draw(st.sampled_from(FINISH_REASONS))
        else:
            row[f"{side}_token_ids"] = draw(st.one_of(st.lists(st.integers(-5, 2**31 + 5), max_size=4), JSON))
            row[f"{side}_token_ids_vocab"] = draw(st.one_of(st.just("0" * 64), TEXT, JSON))
            row[f"{side}_finish_reason"] = draw(st.one_of(st.sampled_from(FINISH_REASONS), TEXT, JSON))
    row.update(draw(st.dictionaries(st.sampled_from(["topic", "score", "meta", "source"]), JSON, max_size=2)))
    return row


def _writable(kind: pa.DataType) -> bool:
    """Whether Parquet can store the type (no struct without fields, at any depth)."""
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(_writable(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _writable(kind.value_type)
    return True


def parquet_table(rows: list[dict], bad_utf8: bool) -> pa.Table:
    """The rows as Arrow columns the way a user's tool would write them: each column typed when one
    Arrow type holds it, else its values as JSON text; with bad_utf8, one string column holds bytes
    that are not UTF-8 (a writer that does not validate)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
            assert _writable(array.type)
        except (pa.ArrowException, AssertionError, OverflowError, TypeError, ValueError):
            array = pa.array([json.dumps(value) for value in values], pa.string())
        columns[name] = array
    strings = [name for name, array in columns.items() if pa.types.is_string(array.type)]
    if bad_utf8 and strings:
        name = strings[0]
        raw = [None if value is None else value.encode("utf-8") + b"\xff\xfe\xc3" for value in columns[name].to_pylist()]
        columns[name] = pa.array(raw, pa.binary()).view(pa.string())
    return pa.table(columns) if columns else pa.table({"empty": pa.nulls(len(rows))}).drop_columns(["empty"])


@st.composite
def pairs_sources(draw) -> tuple[str, bytes | pa.Table, int | None]:
    """(suffix, content, rows): a JSONL, JSON or Parquet pairs file, and how many rows it holds
    (None: a line or the whole file replaced by something else)."""
    with_id, clean = draw(st.booleans()), draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS[:-1])) if clean else draw(st.sampled_from([None, *LAYOUTS]))
    rows = draw(st.lists(pair_rows(with_id, clean, layout), min_size=1 if clean else 0, max_size=5))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".parquet"]))
    if suffix == ".parquet":
        return suffix, parquet_table(rows, bad_utf8=draw(st.integers(0, 9)) == 0), len(rows)
    if suffix == ".jsonl":
        lines = [json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8") for row in rows]
        inserted = draw(st.integers(0, 5)) == 0
        if inserted:  # a blank, garbled or non-object line somewhere
            lines.insert(draw(st.integers(0, len(lines))), draw(st.one_of(st.binary(max_size=8),
                                                                          JSON.map(lambda v: json.dumps(v).encode()))))
        return suffix, b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b""), None if inserted else len(rows)
    whole = draw(st.integers(0, 9)) > 0
    return suffix, json.dumps(rows if whole else draw(JSON)).encode("utf-8"), len(rows) if whole else None


def damaged(draw, data: bytes) -> bytes:
    """data truncated, with bytes overwritten, or with junk appended."""
    how = draw(st.sampled_from(["truncate", "overwrite", "append"]))
    if not data or how == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=8))
        data[at: at + len(junk)] = junk
    return bytes(data)


# ---------------------------------------------------------------- the pairs reader


@checked(max_examples=PAIRS_EXAMPLES)
@given(source=pairs_sources(), chunk_rows=st.integers(1, 3), garble=st.integers(0, 15), data=st.data())
def test_pairs_reader_gives_rows_or_one_line(source, chunk_rows, garble, data):
    suffix, content, num_rows = source
    with tempfile.TemporaryDirectory(prefix="dadpo-props-") as folder:
        path = Path(folder) / f"pairs{suffix}"
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
            if garble == 0:
                path.write_bytes(damaged(data.draw, path.read_bytes()))
        else:
            path.write_bytes(damaged(data.draw, content) if garble == 0 else content)
        for load, name in ((load_pairs, "pairs"), (load_prompts, "prompts")):
            result = outcome(lambda: load(path, workdir=Path(folder) / name, chunk_rows=chunk_rows))
            event(f"{name}: {type(result).__name__}")
            if isinstance(result, NormalizedFile):
                table = result.read()
                assert table.height == len(result) and table["id"].null_count() == 0
                assert garble == 0 or num_rows is None or len(result) == num_rows  # every row, none twice
                for prompt in table["prompt"]:
                    assert isinstance(decode_prompt(prompt), (list, str))


# ---------------------------------------------------------------- the cache's manifest and shards


class Pristine(tuple):
    """(work folder, manifest, {shard index: bytes}); a short repr for hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Pristine({self[0]})"


@pytest.fixture(scope="module")
def pristine(cache_dir, tmp_path_factory) -> Pristine:
    """A copy of the test cache that each generated input overwrites (manifest, one shard), and the
    original manifest and shard bytes to put back."""
    work = tmp_path_factory.mktemp("props-cache") / "cache"
    shutil.copytree(cache_dir, work)
    manifest = json.loads((work / "manifest.json").read_text())
    shards = {entry["index"]: (work / entry["file"]).read_bytes() for entry in manifest["shards"]}
    return Pristine((work, manifest, shards))


def restore(work: Path, manifest: dict, shards: dict[int, bytes]) -> None:
    (work / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["shards"]:
        (work / entry["file"]).write_bytes(shards[entry["index"]])


def same_type(value):
    """Another value of value's JSON type (a list: some of its items)."""
    if isinstance(value, bool) or value is None:
        return st.sampled_from([value, not value] if isinstance(value, bool) else [None])
    if isinstance(value, int):
        return st.one_of(st.integers(-2, 50), st.integers(value - 2, value + 2))
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.one_of(TEXT, st.just(value[:-1]), st.just(value + "0"))
    if isinstance(value, list):
        return st.lists(st.sampled_from(value), max_size=len(value)) if value else st.just([])
    return st.just(value)


@st.composite
def mutated(draw, value):
    """value with one to three of its nested fields replaced by another value of the same type
    (the schema still holds, so the checks after it run), by any JSON value, or removed."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.integers(1, 3))):
        parent, key, node = None, None, value
        while isinstance(node, (dict, list)) and node and (parent is None or draw(st.booleans())):
            parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        if parent is None:
            continue
        action = draw(st.sampled_from(["same type", "same type", "any", "remove"]))
        if action == "remove":
            del parent[key]
        elif action == "same type":
            parent[key] = draw(same_type(node))
        else:
            parent[key] = draw(st.one_of(JSON, st.integers(-3, 3), st.sampled_from([None, "", [], {}])))
    return value


@checked(max_examples=MANIFEST_EXAMPLES)
@given(kind=st.sampled_from(["mutated", "mutated", "any JSON", "damaged bytes"]), data=st.data())
def test_manifest_reader_gives_a_cache_or_one_line(pristine, kind, data):
    work, manifest, shards = pristine
    restore(work, manifest, shards)
    if kind == "mutated":
        text = json.dumps(data.draw(mutated(manifest)), ensure_ascii=data.draw(st.booleans())).encode("utf-8")
    elif kind == "any JSON":
        text = json.dumps(data.draw(JSON)).encode("utf-8")
    else:
        text = damaged(data.draw, json.dumps(manifest).encode("utf-8"))
    (work / "manifest.json").write_bytes(text)
    result = outcome(lambda: read_manifest(work))
    event(f"manifest: {type(result).__name__}")
    if isinstance(result, dict):
        cache = outcome(lambda: open_cache(work))
        event(f"open_cache: {type(cache).__name__}")
        if not isinstance(cache, DadpoError):
            frame = outcome(cache.read)
            # the shards were checked against the manifest: the rows it records, no more
            assert isinstance(frame, DadpoError) or frame.height == sum(entry["rows"] for entry in result["shards"])


@checked(max_examples=SHARD_EXAMPLES)
@given(index=st.integers(0, 2), checksum_updated=st.integers(0, 3), data=st.data())
def test_shard_reader_gives_rows_or_one_line(pristine, index, checksum_updated, data):
    """A damaged shard: with the manifest's size and checksum left as they were (the check refuses
    it), or recomputed for the damaged file (as if it was damaged before it was recorded), so the
    Parquet reader itself meets the damage."""
    work, manifest, shards = pristine
    restore(work, manifest, shards)
    position = index % len(shards)
    entry = manifest["shards"][position]
    broken = damaged(data.draw, shards[entry["index"]])
    (work / entry["file"]).write_bytes(broken)
    if checksum_updated:
        changed = copy.deepcopy(manifest)
        changed["shards"][position].update(sha256=hashlib.sha256(broken).hexdigest(), bytes=len(broken))
        (work / "manifest.json").write_text(json.dumps(changed))
    cache = outcome(lambda: open_cache(work, verify=data.draw(st.booleans())))
    event(f"open_cache: {type(cache).__name__}")
    if not isinstance(cache, DadpoError):
        columns = data.draw(st.sampled_from([None, ["id", "ref_logp_chosen", "ref_chosen_ids"]]))
        frame = outcome(lambda: cache.read(columns, verify=data.draw(st.booleans())))
        event(f"read: {type(frame).__name__}")
        assert isinstance(frame, (pl.DataFrame, DadpoError))


# ---------------------------------------------------------------- the prompt renderer


@st.composite
def conversations(draw) -> list[dict]:
    """What chat templates are made for: a system turn perhaps, then user and assistant in turn,
    ending with the user."""
    turns = draw(st.integers(0, 2)) * 2 + 1
    system = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    return system + [{"role": "user" if i % 2 == 0 else "assistant", "content": draw(TEXT)} for i in range(turns)]


CONVERSATION = conversations()


@pytest.fixture(scope="module")
def renderers(models) -> list[ModelTokenizer]:
    """Each tiny model's tokenizer with its own template, the teacher's under every test template
    (dadpo.tiny.TEMPLATES), and both in plain mode (no template)."""
    result = []
    for family in ("teacher", "student"):
        tokenizer = AutoTokenizer.from_pretrained(models[family])
        result += [ModelTokenizer(tokenizer, f"--{family} tiny"), ModelTokenizer(tokenizer, f"--{family} plain", chat=False)]
    for name, template in TEMPLATES.items():
        tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
        tokenizer.chat_template = template
        result.append(ModelTokenizer(tokenizer, f"--teacher {name}", template_date="2024-01-01"))
    return result


@checked(max_examples=RENDER_EXAMPLES)
@given(which=st.integers(0, 100), messages=st.one_of(CONVERSATION, st.lists(MESSAGE, max_size=4), CONVERSATION,
                                                       st.lists(ODD_MESSAGE, max_size=4), JSON),
       raw=TEXT, add_generation_prompt=st.booleans(), responses=st.tuples(TEXT, TEXT))
def test_prompt_renderer_gives_ids_or_one_line(renderers, which, messages, raw, add_generation_prompt, responses):
    rule = renderers[which % len(renderers)]
    text = outcome(lambda: rule.render(messages, add_generation_prompt, "props row 0"))
    event(f"render: {type(text).__name__}")
    assert isinstance(text, (str, DadpoError))
    for prompt in (messages, raw):
        ids = outcome(lambda: rule.encode_prompt(prompt, "props row 0"))
        assert isinstance(ids, DadpoError) or all(isinstance(i, int) for i in ids)
        chosen, rejected = (Response(response, None, None, "stop") for response in responses)
        triple = outcome(lambda: rule.encode_pair(prompt, chosen, rejected, "props row 0"))
        assert isinstance(triple, DadpoError) or all(isinstance(i, int) for part in triple for i in part)
