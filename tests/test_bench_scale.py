"""benchmarks/bench_scale.py in its quick mode (1000 short pairs, shards of 250, the tiny models):
it runs as a real subprocess, prints its table, and its numbers agree with what is on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq

from support import ENV, REPO

MIB = 2**20


def pq_rows(path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def test_quick_mode_prints_the_table_and_sane_numbers(models, tmp_path):
    report = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--quick", "--teacher", str(models["teacher"]),
         "--reference", str(models["student"]), "--workdir", str(tmp_path), "--read-check", "1000", "--keep",
         "--json", str(report)],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("| pairs | planned | plan workers | load s | plan s |") for line in lines), result.stdout
    assert any(line.startswith("| 1,000 | 1,000 |") for line in lines), result.stdout
    assert any(line.startswith("train's first steps on the 1,000-pair cache") for line in lines), result.stdout

    results = json.loads(report.read_text())
    bare, row = results["bare"], results["results"][0]
    check = row["read_check"]
    pairs_file = tmp_path / "pairs-1000-10-40.jsonl"
    with open(pairs_file, encoding="utf-8") as handle:
        assert sum(1 for _ in handle) == 1000
    assert row["n"] == 1000 and row["pairs_bytes"] == pairs_file.stat().st_size

    # Every pair fits the tiny models' 512 positions: all are planned, and all reach the shards.
    shards = sorted((tmp_path / "cache-1000" / "shards").glob("*.parquet"))
    assert len(shards) == 4
    tables = [pq.read_table(shard) for shard in shards]
    assert row["planned"] == check["rows"] == sum(table.num_rows for table in tables) == 1000
    reference_ids = sum(pc.sum(pc.list_value_length(table[f"ref_{part}_ids"])).as_py()
                        for table in tables for part in ("prompt", "chosen", "rejected"))
    assert check["token_ids"] == reference_ids
    assert check["dtypes"]["ref_prompt_ids"] == "List(Int32)"  # Arrow-backed, never Python lists
    # both models' ids per pair: the reference's, plus the teacher's (a tokenizer of the same size)
    assert reference_ids / 1000 < row["tokens_per_pair"] < 3 * reference_ids / 1000

    assert row["load_s"] > 0 and row["plan_s"] > 0 and row["cpu_s"] > 0
    assert 1 <= row["workers"] <= 8
    assert 1 * MIB < bare["VmHWM"] < 200 * MIB
    assert row["peak"] >= row["imports"]["VmHWM"] > bare["VmHWM"]
    assert row["above_interpreter"] == row["peak"] - bare["VmHWM"]
    assert 0 <= row["above_imports"] < 1024 * MIB  # 1000 short pairs cost nowhere near a GiB
    assert 0 < row["all_above_imports"] < 2048 * MIB
    assert check["imports_rss"] <= check["after_read_rss"] <= check["read_peak"]


def test_score_flag_scores_every_pair_with_the_tiny_models(models, tmp_path):
    report = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--quick", "--sizes", "200", "--score",
         "--teacher", str(models["teacher"]), "--reference", str(models["student"]), "--workdir", str(tmp_path),
         "--keep", "--json", str(report)],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.startswith("| pairs | backend | score s | tokens scored |") for line in result.stdout.splitlines())
    assert any(line.startswith("| 200 | hf |") for line in result.stdout.splitlines()), result.stdout
    row = json.loads(report.read_text())["results"][0]
    done = row["score"]
    shards = sorted((tmp_path / "cache-200" / "shards").glob("*.parquet"))
    assert done["rows"] == row["planned"] == sum(pq_rows(shard) for shard in shards) == 200
    # every sequence of both models: (prompt + chosen) and (prompt + rejected) per pair
    assert done["tokens"] >= 200 * row["tokens_per_pair"] * 0.5 and done["seconds"] > 0
    assert 0 <= done["above_imports"] < 1024 * MIB
