"""cache-teacher in-process: the cache round trip, manifest fields, shards readable by plain polars."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo import __version__
from dadpo.cache import open_cache
from dadpo.cache_teacher import CacheTeacherConfig, cache_teacher
from dadpo.pairs import load_pairs, prompt_messages
from dadpo.scoring.base import EngineOptions
from dadpo.tiny import make_tiny_pairs
from dadpo.tokenization import tokenize_example

from conftest import write_jsonl


@pytest.fixture(scope="module")
def cached(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rows = make_tiny_pairs(10, seed=5)
    for i, row in enumerate(rows):
        row["source"] = f"synthetic-{i % 3}"  # an extra column: must travel to the cache
    pairs_file = write_jsonl(root / "pairs.jsonl", rows)
    summary = cache_teacher(CacheTeacherConfig(
        pairs=str(pairs_file), teacher=str(models["teacher"]), reference=str(models["student"]),
        out=str(root / "cache"), backend="hf", dtype="float32", shard_size=4, progress=False,
        engine=EngineOptions(batch_size=3, device="cpu"),
    ))
    return summary, root / "cache", pairs_file


def test_summary_and_manifest(cached, models):
    summary, cache_dir, pairs_file = cached
    assert summary.complete and summary.rows == 10 and summary.num_shards == 3 and summary.dropped == 0
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["dadpo_version"] == __version__
    assert manifest["pairs"]["fingerprint"] == load_pairs(pairs_file).fingerprint
    assert manifest["pairs"]["extra_columns"] == ["source"]
    assert manifest["length_rule"] == {"max_length": 512, "on_overlong": "drop",
                                       "applies_to": "prompt+response tokens, teacher and reference"}
    for role, name in (("teacher", "teacher"), ("reference", "student")):
        record = manifest[role]
        assert record["model"] == str(models[name])
        assert record["dtype"] == "float32" and record["backend"] == "hf"
        assert record["backend_version"].startswith("transformers ")
        assert len(record["weights_digest"]) == 64 and len(record["tokenizer_digest"]) == 64
        assert record["chat_template"] is True
    assert manifest["teacher"]["tokenizer_digest"] != manifest["reference"]["tokenizer_digest"]
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    for shard in manifest["shards"]:
        data = (cache_dir / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not (cache_dir / "work").exists()  # scratch removed once complete


def test_shards_readable_by_plain_polars(cached):
    _, cache_dir, pairs_file = cached
    frame = pl.read_parquet(cache_dir / "shards" / "*.parquet").sort("pair_index")
    assert frame["id"].to_list() == load_pairs(pairs_file).frame["id"].to_list()
    for column in ("teacher_logp_chosen", "teacher_logp_rejected", "ref_logp_chosen", "ref_logp_rejected"):
        assert frame[column].dtype == pl.Float64 and (frame[column] < 0).all()
    assert frame["source"].to_list() == [f"synthetic-{i % 3}" for i in range(10)]
    assert open_cache(cache_dir).read().height == 10


@pytest.mark.parametrize("role,name,prefix", [("teacher", "teacher", "teacher"), ("reference", "student", "ref")])
def test_cached_values_round_trip(cached, models, role, name, prefix):
    """Every cached number equals a fresh computation under the tokenization rule."""
    _, cache_dir, _ = cached
    frame = open_cache(cache_dir).read()
    tok = AutoTokenizer.from_pretrained(models[name])
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    for row in frame.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            prompt_ids, response_ids = tokenize_example(tok, prompt_messages(row["prompt"]), row[side], chat=True)
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].double()
            logprobs = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1].gather(1, torch.tensor(response_ids)[:, None])
            assert row[f"{prefix}_logp_{side}"] == pytest.approx(float(logprobs.sum()), abs=1e-5)
            assert row[f"{prefix}_ntok_{side}"] == len(response_ids)
            if role == "reference":
                assert row["ref_prompt_ids"] == prompt_ids
                assert row[f"ref_{side}_ids"] == response_ids
