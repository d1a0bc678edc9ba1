"""cache-teacher in-process: the cache round trip, manifest fields, shards readable by plain polars."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo import __version__
from dadpo.cache import CacheTeacherConfig, cache_teacher, open_cache
from dadpo.engine import EngineOptions
from dadpo.pairs import load_pairs
from dadpo.tiny import make_tiny_pairs
from support import assert_logps_close, naive_logprob, write_jsonl


@pytest.fixture(scope="module")
def cached(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rows = make_tiny_pairs(10, seed=5)
    for i, row in enumerate(rows):
        row["source"] = f"synthetic-{i % 3}"  # an extra column: must travel to the cache
    pairs_file = write_jsonl(root / "pairs.jsonl", rows)
    summary = cache_teacher(CacheTeacherConfig(
        pairs=str(pairs_file), teacher=[str(models["teacher"])], reference=str(models["student"]),
        out=str(root / "cache"), backend="hf", dtype="float32", shard_size=4, progress=False,
        engine=EngineOptions(batch_size=3, device="cpu"),
    ))
    return summary, root / "cache", pairs_file


def test_summary_and_manifest(cached, models):
    summary, cache_dir, pairs_file = cached
    assert summary.complete and summary.rows == 10 and summary.num_shards == 3 and summary.dropped == 0
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["dadpo_version"] == __version__
    assert manifest["tokenization_rule"] == 2 and manifest["template_date"] is None
    assert manifest["pairs"]["fingerprint"] == load_pairs(pairs_file).fingerprint
    assert manifest["pairs"]["extra_columns"] == ["source"] and manifest["pairs"]["prompt_format"] == "chat"
    assert manifest["length_rule"] == {"max_length": 512, "on_overlong": "drop",
                                       "applies_to": "prompt+response tokens, under every model's tokenizer"}
    assert list(manifest["teachers"]) == [""]
    for record, name in ((manifest["teachers"][""], "teacher"), (manifest["reference"], "student")):
        assert record["model"] == str(models[name])
        assert record["dtype"] == "float32" and record["backend"] == "hf"
        assert record["backend_version"].startswith("transformers ")
        assert len(record["weights_digest"]) == 64 and len(record["tokenizer_digest"]) == 64
        assert record["chat_template"] is True and record["server"] is None
    assert manifest["teachers"][""]["tokenizer_digest"] != manifest["reference"]["tokenizer_digest"]
    assert manifest["totals"]["sequences_scored"] == 40 and manifest["totals"]["sequences_reused"] == 0
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    for shard in manifest["shards"]:
        data = (cache_dir / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not (cache_dir / "work").exists()  # scratch removed once complete


def test_shards_readable_by_plain_polars(cached):
    _, cache_dir, pairs_file = cached
    frame = pl.read_parquet(cache_dir / "shards" / "*.parquet").sort("pair_index")
    assert frame["id"].to_list() == load_pairs(pairs_file).read()["id"].to_list()
    for column in ("teacher_logp_chosen", "teacher_logp_rejected", "ref_logp_chosen", "ref_logp_rejected"):
        assert frame[column].dtype == pl.Float64 and (frame[column] < 0).all()
    assert frame["source"].to_list() == [f"synthetic-{i % 3}" for i in range(10)]
    assert open_cache(cache_dir).read().height == 10


@pytest.mark.parametrize("role,name,prefix,end", [("teacher", "teacher", "teacher", "<|im_end|>"),
                                                  ("reference", "student", "ref", "</s>")])
def test_cached_values_round_trip(cached, models, role, name, prefix, end):
    """Every cached number equals a fresh computation of rule v2 written out here: the generation
    prompt as the template renders it, the response's own tokens, then the end-of-turn token."""
    _, cache_dir, _ = cached
    frame = open_cache(cache_dir).read()
    tok = AutoTokenizer.from_pretrained(models[name])
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    for row in frame.iter_rows(named=True):
        prompt = json.loads(row["prompt"])
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            response_ids = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(end)]
            assert_logps_close(row[f"{prefix}_logp_{side}"], naive_logprob(model, prompt_ids, response_ids),
                               len(response_ids), f"{prefix}_logp_{side} of row {row['id']}")
            assert row[f"{prefix}_ntok_{side}"] == len(response_ids)
            if role == "reference":
                assert row["ref_prompt_ids"] == prompt_ids
                assert row[f"ref_{side}_ids"] == response_ids
