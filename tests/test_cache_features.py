"""Caches beyond one teacher: several named teachers and their weighted mean in the loss, caches that
grow (--reuse-from), a reference-only cache for plain DPO, and train's teacher-margin filters. Each
checked against an independent computation (single-teacher caches, a fresh cache, hand-computed loss)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dadpo.cache import CacheTeacherConfig, cache_teacher, open_cache
from dadpo.errors import DadpoError
from dadpo.inspect_cache import format_report, inspect_cache
from dadpo.recipes.dadpo import TrainConfig, train
from dadpo.tiny import make_tiny_pairs
from dadpo.training.data import global_batch_rows, split_eval
from support import (assert_logps_close, assert_one_line_error, loss_tolerance, metrics, naive_logprob, run_cli,
                     write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")


def build(models, pairs, out, teachers: list[str], **extra) -> object:
    return cache_teacher(CacheTeacherConfig(pairs=str(pairs), teacher=teachers, reference=str(models["student"]),
                                            out=str(out), backend="hf", dtype="float32", shard_size=4,
                                            progress=False, **extra))


@pytest.fixture(scope="module")
def two_teachers(models, templated, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    pairs = write_jsonl(root / "pairs.jsonl", make_tiny_pairs(12, seed=21))
    big, think = str(models["teacher"]), str(templated["think"])
    build(models, pairs, root / "both", [f"big={big}", f"think={think}"])
    build(models, pairs, root / "big", [big])
    build(models, pairs, root / "think", [think])
    return {name: open_cache(root / name) for name in ("both", "big", "think")}, pairs


def test_several_teachers_get_a_set_of_columns_each(two_teachers):
    caches, _ = two_teachers
    both = caches["both"]
    assert list(both.teachers) == ["big", "think"] and both.teachers["think"]["model"].endswith("think")
    rows = both.read()
    for name in ("big", "think"):
        alone = caches[name].read()
        for side in ("chosen", "rejected"):
            assert_logps_close(rows[f"teacher_{name}_logp_{side}"].to_numpy(), alone[f"teacher_logp_{side}"].to_numpy(),
                               alone[f"teacher_ntok_{side}"].to_numpy(), f"teacher {name} {side}: both vs alone")
            assert rows[f"teacher_{name}_ntok_{side}"].to_list() == alone[f"teacher_ntok_{side}"].to_list()
    assert "teacher_logp_chosen" not in rows.columns
    report = format_report(inspect_cache(both.path))
    assert "h_te[big]" in report and "h_te[think]" in report and "d_te[think]" in report


def test_the_teacher_term_is_the_weighted_mean_of_the_teachers(two_teachers, models, tmp_path):
    """Step 1's loss by hand: log te(y) = 0.7 log big(y) + 0.3 log think(y) (the log of a geometric mixture)."""
    caches, _ = two_teachers
    beta1, beta2, batch, seed = 0.3, 0.5, 4, 4
    train(TrainConfig(cache=str(caches["both"].path), out=str(tmp_path / "run"), model=str(models["student_b"]),
                      beta1=beta1, beta2=beta2, teacher_weights="big=7,think=3", batch_size=batch, grad_accum=1,
                      max_steps=1, seed=seed, eval_fraction=0.0, lr=1e-4, progress=False, start_check=0))
    rows = global_batch_rows(caches["both"].read(), 0, batch, 10**9, seed)
    policy = AutoModelForCausalLM.from_pretrained(models["student_b"], dtype=torch.float32).eval()
    losses = []
    for row in rows.iter_rows(named=True):
        h_policy = (naive_logprob(policy, row["ref_prompt_ids"], row["ref_chosen_ids"])
                    - naive_logprob(policy, row["ref_prompt_ids"], row["ref_rejected_ids"]))
        h_ref = row["ref_logp_chosen"] - row["ref_logp_rejected"]
        h_te = sum(w * (row[f"teacher_{n}_logp_chosen"] - row[f"teacher_{n}_logp_rejected"])
                   for n, w in (("big", 0.7), ("think", 0.3)))
        losses.append(math.log1p(math.exp(-(beta1 * (h_policy - h_ref) + beta2 * (h_policy - h_te)))))
    tolerance = loss_tolerance(beta1 + beta2, rows["ref_ntok_chosen"].to_numpy(), rows["ref_ntok_rejected"].to_numpy())
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(sum(losses) / len(losses), abs=tolerance)
    with pytest.raises(DadpoError, match="--teacher-weights big=1,huge=2: 'huge=2' is not NAME=WEIGHT"):
        train(TrainConfig(cache=str(caches["both"].path), out=str(tmp_path / "x"), teacher_weights="big=1,huge=2",
                          progress=False))


def test_a_growing_cache_reuses_what_was_scored(models, tmp_path):
    pairs = make_tiny_pairs(12, seed=22)
    old = write_jsonl(tmp_path / "old.jsonl", pairs[:8])
    grown = write_jsonl(tmp_path / "grown.jsonl", pairs)
    teacher = [str(models["teacher"])]
    build(models, old, tmp_path / "old", teacher)
    summary = build(models, grown, tmp_path / "grown", teacher, reuse_from=[str(tmp_path / "old")])
    fresh = build(models, grown, tmp_path / "fresh", teacher)
    # 8 old pairs x 2 responses x 2 models copied; the 4 new pairs scored
    assert (summary.sequences_reused, summary.sequences_scored) == (32, 16)
    assert (fresh.sequences_reused, fresh.sequences_scored) == (0, 48)
    manifest = json.loads((tmp_path / "grown" / "manifest.json").read_text())
    assert manifest["totals"]["sequences_reused"] == 32
    got, want = open_cache(tmp_path / "grown").read(), open_cache(tmp_path / "fresh").read()
    assert got.drop([c for c in got.columns if "_logp_" in c]).equals(want.drop([c for c in want.columns
                                                                                  if "_logp_" in c]))
    for column in (c for c in got.columns if "_logp_" in c):
        assert_logps_close(got[column].to_numpy(), want[column].to_numpy(),
                           want[column.replace("_logp_", "_ntok_")].to_numpy(), f"{column}: reused vs fresh")


def test_an_iterative_round_rescores_only_the_new_student_responses(models, tmp_path):
    pairs = make_tiny_pairs(8, seed=23)
    first = write_jsonl(tmp_path / "round1.jsonl", pairs)
    second = write_jsonl(tmp_path / "round2.jsonl", [{**p, "rejected": "A new answer from the trained student."}
                                                     for p in pairs])
    build(models, first, tmp_path / "r1", [str(models["teacher"])])
    summary = build(models, second, tmp_path / "r2", [str(models["teacher"])], reuse_from=[str(tmp_path / "r1")])
    assert (summary.sequences_reused, summary.sequences_scored) == (16, 16)  # chosen under both models: copied


def test_a_reference_only_cache_trains_plain_dpo(models, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(12, seed=24))
    result = run_cli("cache-teacher", "--pairs", pairs, "--reference", models["student"], "--out", tmp_path / "ref",
                     "--backend", "hf", "--shard-size", 6, "--quiet")
    assert result.returncode == 0, result.stderr
    cache = open_cache(tmp_path / "ref")
    assert cache.teachers == {} and not any(c.startswith("teacher") for c in cache.read().columns)
    summary = train(TrainConfig(cache=str(cache.path), out=str(tmp_path / "dpo"), beta1=0.1, beta2=0.0, batch_size=4,
                                grad_accum=1, max_steps=1, eval_fraction=0.0, progress=False))
    rows = cache.read()  # policy == reference at step 0: log 2, up to the re-scoring's rounding
    tolerance = loss_tolerance(0.1, rows["ref_ntok_chosen"].max(), rows["ref_ntok_rejected"].max())
    assert summary["final_train"]["loss"] == pytest.approx(math.log(2), abs=tolerance)
    refused = run_cli("train", "--cache", cache.path, "--out", tmp_path / "x", "--beta2", "0.1", "--quiet")
    assert_one_line_error(refused, "--beta2 0.1", "holds no teacher", "--beta2 0")
    assert not (tmp_path / "x").exists()


def test_teacher_margin_filters(cache_dir, models, tmp_path):
    rows = open_cache(cache_dir).read()
    margins = (rows["teacher_logp_chosen"] - rows["teacher_logp_rejected"]).to_numpy()
    low, high = float(np.quantile(margins, 0.25)), float(np.quantile(margins, 0.9))
    expected = int(((margins < low) | (margins > high)).sum())
    result = run_cli("train", "--cache", cache_dir, "--out", tmp_path / "run", "--min-teacher-margin", low,
                     "--max-teacher-margin", high, "--batch-size", 4, "--grad-accum", 1, "--max-steps", 1,
                     "--eval-fraction", 0.1, "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"left out {expected} pairs outside the teacher-margin range" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kept = rows.filter((rows["teacher_logp_chosen"] - rows["teacher_logp_rejected"] >= low)
                       & (rows["teacher_logp_chosen"] - rows["teacher_logp_rejected"] <= high))
    train_rows, eval_rows = split_eval(kept, 0.1)
    assert summary["filtered_by_teacher_margin"] == expected
    assert (summary["train_pairs"], summary["eval_pairs"]) == (train_rows.height, eval_rows.height)
    assert_one_line_error(run_cli("train", "--cache", cache_dir, "--out", tmp_path / "y", "--min-teacher-margin", 5,
                                  "--max-teacher-margin", 1), "--min-teacher-margin 5.0 is above --max-teacher-margin")
