"""Caches made by dadpo 0.1 (cache schema 1, tokenization rule 1) still train, inspect and verify;
re-running cache-teacher into one says the rule changed and what to do."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dadpo.cache import open_cache
from dadpo.specs import load_spec
from dadpo.tokenization import legacy_digest
from support import assert_one_line_error, cache_args, loss_tolerance, run_cli


@pytest.fixture(scope="module")
def v1_cache(cache_dir, models, tmp_path_factory):
    """The session's cache rewritten as dadpo 0.1 wrote caches: schema 1 columns and manifest."""
    old = tmp_path_factory.mktemp("v1") / "cache"
    (old / "shards").mkdir(parents=True)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    columns = list(load_spec("cache.v1.columns.json")["columns"])
    entries = []
    for entry in manifest["shards"]:
        file = old / entry["file"]
        pq.write_table(pq.read_table(cache_dir / entry["file"], columns=columns), file, compression="zstd")
        data = file.read_bytes()
        entries.append({key: entry[key] for key in ("index", "file", "rows", "pair_range", "dropped_ids")}
                       | {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    def model(record: dict, name: str) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        return {key: record[key] for key in ("model", "revision", "weights_digest", "chat_template", "dtype",
                                             "backend", "backend_version", "fp32_head")} | {
            "tokenizer_digest": legacy_digest(tokenizer, True)}

    v1 = {"schema_version": 1, "dadpo_version": "0.1.0", "tokenization_rule": 1,
          "pairs": {k: manifest["pairs"][k] for k in ("source", "fingerprint", "rows", "extra_columns")},
          "length_rule": manifest["length_rule"], "shard_size": manifest["shard_size"],
          "num_shards": manifest["num_shards"], "teacher": model(manifest["teachers"][""], "teacher"),
          "reference": model(manifest["reference"], "student"), "shards": entries, "complete": True,
          "totals": {k: manifest["totals"][k] for k in ("rows", "dropped", "shards_done")}}
    (old / "manifest.json").write_text(json.dumps(v1))
    return old


def test_a_schema_1_cache_still_trains_inspects_and_verifies(v1_cache, models, tmp_path):
    result = run_cli("train", "--cache", v1_cache, "--out", tmp_path / "run", "--model", models["student"],
                     "--beta1", 0.5, "--beta2", 0, "--batch-size", 4, "--grad-accum", 1, "--max-steps", 1,
                     "--eval-fraction", 0, "--quiet")
    assert result.returncode == 0, result.stderr
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    rows = open_cache(v1_cache).read()  # the policy is the cached reference: log 2 up to its re-scoring's rounding
    tolerance = loss_tolerance(0.5, rows["ref_ntok_chosen"].max(), rows["ref_ntok_rejected"].max())
    assert first["loss"] == pytest.approx(math.log(2), abs=tolerance)
    inspected = run_cli("inspect", v1_cache)
    assert inspected.returncode == 0 and "h_te" in inspected.stdout, inspected.stderr
    verified = run_cli("verify-cache", v1_cache, "--sample", 8, "--model", models["student"])
    assert verified.returncode == 0, verified.stderr
    # the teacher columns were tokenized by rule 1, which is gone: said in one line
    assert_one_line_error(run_cli("verify-cache", v1_cache, "--teacher", "--model", models["student"]),
                          "schema 1 cache", "rule 1", "only its reference columns")
    # another tokenizer than the one rule 1 recorded is still refused
    assert_one_line_error(run_cli("train", "--cache", v1_cache, "--out", tmp_path / "x", "--model",
                                  models["teacher"], "--quiet"), "tokenizer or chat template differs")


def test_cache_teacher_into_a_schema_1_cache_says_the_rule_changed(v1_cache, models, pairs_file, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(v1_cache, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    line = assert_one_line_error(run_cli(*cache_args(pairs_file, models, copy)), f"--out {copy}",
                                 "tokenization rule 1", "rule 2", "Training from that cache still works",
                                 "--overwrite")
    assert "data_specs/tokenization.v2.md" in line
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
