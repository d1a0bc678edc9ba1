"""The length rule (both tokenizers, drop whole pairs, never truncate), the reuse guard
(changed settings are named, --overwrite starts over) and integrity at read time (a truncated or
altered shard, or a manifest pointing outside the folder, is refused naming the file)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from dadpo.cache import open_cache
from dadpo.errors import DadpoError
from support import assert_one_line_error, cache_args, run_cli, shard_rows, write_jsonl

QUESTION = [{"role": "user", "content": "Q"}]
END_OF_TURN = {"teacher": "<|im_end|>", "reference": "</s>"}


def _pairs() -> list[dict]:
    short = [{"id": f"short-{i}", "prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
             for i in range(5)]
    # The teacher's byte-level BPE spends more tokens on Japanese, the student's on runs of spaces.
    long_for_teacher = {"id": "long-for-teacher", "prompt": QUESTION,
                        "chosen": "日本語のテキストも少し含めます。東京は日本の首都です。" * 2, "rejected": "短い"}
    long_for_student = {"id": "long-for-student", "prompt": QUESTION,
                        "chosen": "    indented   code   " * 5, "rejected": "x"}
    long_for_both = {"id": "long-for-both", "prompt": "Tell a long story.", "chosen": "Once upon a time. " * 20,
                     "rejected": "No."}
    return short[:2] + [long_for_teacher] + short[2:3] + [long_for_student, long_for_both] + short[3:]


def _ids(tokenizer, role, prompt, response) -> tuple[list[int], list[int]]:
    """Rule v2 written out: the rendered generation prompt; the response's tokens, then the end of turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return (tokenizer(text, add_special_tokens=False)["input_ids"],
            response_ids + [tokenizer.convert_tokens_to_ids(END_OF_TURN[role])])


def _longest(tokenizer, role, pair) -> int:
    return max(sum(map(len, _ids(tokenizer, role, pair["prompt"], pair[side]))) for side in ("chosen", "rejected"))


@pytest.fixture(scope="module")
def length_case(models, tmp_path_factory):
    """Pairs and a --max-length that one tokenizer exceeds and the other does not, each way."""
    root = tmp_path_factory.mktemp("length")
    pairs_file = write_jsonl(root / "pairs.jsonl", _pairs())
    tokenizers = {role: AutoTokenizer.from_pretrained(models[name]) for role, name in
                  (("teacher", "teacher"), ("reference", "student"))}
    lengths = {row["id"]: {role: _longest(tok, role, row) for role, tok in tokenizers.items()} for row in _pairs()}
    by_teacher, by_student = lengths["long-for-teacher"], lengths["long-for-student"]
    max_length = max(by_teacher["reference"], by_student["teacher"])
    # Preconditions of the test itself: each of these pairs is over on exactly one side.
    assert by_teacher["reference"] <= max_length < by_teacher["teacher"], lengths
    assert by_student["teacher"] <= max_length < by_student["reference"], lengths
    assert min(lengths["long-for-both"].values()) > max_length, lengths
    assert all(max(lengths[f"short-{i}"].values()) <= max_length for i in range(5)), lengths

    out = root / "cache"
    result = run_cli(*cache_args(pairs_file, models, out, "--max-length", max_length, "--quiet"))
    assert result.returncode == 0, result.stderr
    return pairs_file, out, max_length, result.stdout, tokenizers


def test_length_rule_drops_pairs_over_on_either_side_and_never_truncates(length_case):
    pairs_file, out, max_length, stdout, tokenizers = length_case
    dropped = ["long-for-teacher", "long-for-student", "long-for-both"]
    assert f"5 pairs cached, 3 dropped by the length rule (ids in {out}/dropped_ids.txt), complete" in stdout
    assert (out / "dropped_ids.txt").read_text().split() == dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["dropped"] == 3 and manifest["length_rule"]["max_length"] == max_length
    rows = shard_rows(out)
    assert rows["id"].to_list() == [f"short-{i}" for i in range(5)]
    for row in rows.iter_rows(named=True):  # whole responses, on both sides
        for prefix, role in (("teacher", "teacher"), ("ref", "reference")):
            for side in ("chosen", "rejected"):
                prompt_ids, response_ids = _ids(tokenizers[role], role, json.loads(row["prompt"]), row[side])
                assert row[f"{prefix}_ntok_{side}"] == len(response_ids)
                assert len(prompt_ids) + len(response_ids) <= max_length
        assert row["ref_chosen_ids"] == _ids(tokenizers["reference"], "reference", json.loads(row["prompt"]),
                                             row["chosen"])[1]


def test_on_overlong_error_stops_before_writing_anything(models, length_case, tmp_path):
    pairs_file, _, max_length, _, _ = length_case
    out = tmp_path / "cache"
    result = run_cli(*cache_args(pairs_file, models, out, "--max-length", max_length, "--on-overlong", "error"))
    assert_one_line_error(result, "pairs.jsonl row id 'long-for-teacher'", "under the teacher tokenizer",
                          f"exceed --max-length {max_length}")
    assert not out.exists()


def test_guard_names_every_changed_setting(models, length_case, tmp_path):
    """Another reference model, dtype, length rule and pairs file: each is named; nothing is touched."""
    pairs_file, out, max_length, _, _ = length_case
    rows = _pairs()
    rows[0]["chosen"] = "5"
    changed_pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli(*cache_args(changed_pairs, models, out, "--max-length", max_length + 1, "--dtype", "bfloat16",
                                 reference="student_b"))
    line = assert_one_line_error(result, f"--out {out}", "made with different settings", "--overwrite")
    for named in ("pairs content (fingerprint)", f"max length: {max_length} in the cache, {max_length + 1} requested",
                  'teacher dtype: "float32" in the cache, "bfloat16" requested', "reference model",
                  "reference weights digest", "reference dtype"):
        assert named in line
    # Only what changed is named: same teacher, same tokenizers, same number of pairs.
    for unchanged in ("teacher model", "tokenizer,", "number of pairs", "backend"):
        assert unchanged not in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_starts_over(models, length_case, tmp_path):
    pairs_file, out, max_length, _, _ = length_case
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    result = run_cli(*cache_args(pairs_file, models, copy, "--overwrite", "--quiet", reference="student_b"))
    assert result.returncode == 0, result.stderr
    assert "8 pairs cached, 0 dropped by the length rule, complete" in result.stdout
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["reference"]["model"] == str(models["student_b"])
    assert manifest["length_rule"]["max_length"] == 512  # the models' own limit, no longer max_length
    assert (copy / "dropped_ids.txt").read_text() == ""


# ---- integrity at read time --------------------------------------------------------------------


def _truncate(cache, shard):
    shard.write_bytes(shard.read_bytes()[:-100])


def _flip(cache, shard):
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))


def _point_outside(target):
    def edit(cache, shard):
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["shards"][0]["file"] = target
        (cache / "manifest.json").write_text(json.dumps(manifest))
    return edit


DAMAGE = {
    "truncated shard": (_truncate, ["shard-00000-of-00002.parquet", "the shard was truncated"]),
    "altered shard": (_flip, ["shard-00000-of-00002.parquet", "checksum does not match"]),
    "shard path with ..": (_point_outside("../../outside.parquet"), ["'../../outside.parquet'",
                                                                      "must stay inside the cache folder"]),
    "absolute shard path": (_point_outside("/etc/passwd"), ["'/etc/passwd'", "must stay inside the cache folder"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_cache_is_refused_naming_the_file(length_case, tmp_path, case):
    damage, fragments = DAMAGE[case]
    _, out, _, _, _ = length_case
    cache = tmp_path / "cache"
    shutil.copytree(out, cache)
    damage(cache, cache / "shards" / "shard-00000-of-00002.parquet")
    with pytest.raises(DadpoError) as refused:
        open_cache(cache)
    assert all(fragment in str(refused.value) for fragment in fragments), refused.value
    assert_one_line_error(run_cli("verify-cache", cache), *fragments)
    if "shard path" not in case:  # train reads the manifest the same way (open_cache); its CLI once per shard damage
        result = run_cli("train", "--cache", cache, "--out", tmp_path / "run", "--quiet")
        assert_one_line_error(result, *fragments)
        assert not (tmp_path / "run").exists()


def test_verify_cache_accepts_a_whole_cache(length_case):
    _, out, _, _, _ = length_case
    result = run_cli("verify-cache", out)
    assert result.returncode == 0, result.stderr
    assert "complete, 2 shards verified, 5 pairs, 3 dropped" in result.stdout

