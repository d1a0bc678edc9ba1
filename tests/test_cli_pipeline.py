"""The CLI end to end as real subprocesses: cache-teacher, then train from the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.cache import open_cache
from dadpo.training.data import global_batch_rows, split_eval

from support import assert_one_line_error, logp_tolerance, loss_tolerance, naive_logprob, run_cli, write_jsonl


@pytest.fixture(scope="module")
def cache_dir(models, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cache"
    result = run_cli("cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"],
                     "--reference", models["student"], "--out", out, "--backend", "hf", "--dtype", "float32",
                     "--shard-size", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "40 pairs cached" in result.stdout and "complete" in result.stdout
    return out


def test_first_logged_loss_equals_independent_computation(models, cache_dir, tmp_path):
    """Policy start (student_b) differs from the reference (student): the step-1 loss must be the
    daDPO loss of the policy's own log-probs against the cached reference and teacher scalars."""
    run = tmp_path / "run"
    beta1, beta2, batch, accum, seed = 0.5, 0.2, 4, 2, 7
    result = run_cli("train", "--cache", cache_dir, "--out", run, "--model", models["student_b"],
                     "--beta1", beta1, "--beta2", beta2, "--lr", "1e-3", "--batch-size", batch,
                     "--grad-accum", accum, "--max-steps", 2, "--seed", seed, "--eval-fraction", 0.1, "--quiet")
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for key in ("loss", "margin", "reward_accuracy", "lr", "grad_norm", "tokens_per_s"):
        assert all(math.isfinite(s[key]) for s in steps), key

    # Independently: the same rows (documented selection), the policy's log-probs, the formula.
    train_rows, _ = split_eval(open_cache(cache_dir).read(), 0.1)
    rows = global_batch_rows(train_rows, step=0, global_batch=batch * accum, steps_per_epoch=10**9, seed=seed)
    policy = AutoModelForCausalLM.from_pretrained(models["student_b"], dtype=torch.float32).eval()
    losses = []
    for row in rows.iter_rows(named=True):
        prompt = row["ref_prompt_ids"]
        h_policy = (naive_logprob(policy, prompt, row["ref_chosen_ids"])
                    - naive_logprob(policy, prompt, row["ref_rejected_ids"]))
        h_ref = row["ref_logp_chosen"] - row["ref_logp_rejected"]
        h_teacher = row["teacher_logp_chosen"] - row["teacher_logp_rejected"]
        u = beta1 * (h_policy - h_ref) + beta2 * (h_policy - h_teacher)
        losses.append(math.log1p(math.exp(-u)))
    tolerance = loss_tolerance(beta1 + beta2, rows["ref_ntok_chosen"].to_numpy(), rows["ref_ntok_rejected"].to_numpy())
    assert steps[0]["loss"] == pytest.approx(sum(losses) / len(losses), abs=tolerance)
    assert abs(steps[0]["loss"] - math.log(2)) > 1e-3  # the policy really differs from the reference
    check = json.loads((run / "start_check.json").read_text())
    assert check["seq_mean"] > 0.1  # another policy: the start check shows it

    # The checkpoint is a plain HF model + tokenizer.
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model")
    assert AutoTokenizer.from_pretrained(run / "model").chat_template
    assert not torch.equal(reloaded.lm_head.weight, policy.lm_head.weight)  # it trained
    eval_metrics = json.loads((run / "eval.json").read_text())
    assert eval_metrics["eval_pairs"] > 0 and math.isfinite(eval_metrics["eval_loss"])


def test_start_check_from_the_reference_is_zero_drift(cache_dir, tmp_path):
    """Starting at the reference (the default --model), the trainer's forward pass reproduces the
    cached reference log-probs, and the step-0 implicit reward against the reference is ~0."""
    run = tmp_path / "run"
    result = run_cli("train", "--cache", cache_dir, "--out", run, "--max-steps", 1, "--batch-size", 4,
                     "--grad-accum", 1, "--start-check", 6, "--quiet")
    assert result.returncode == 0, result.stderr
    check = json.loads((run / "start_check.json").read_text())
    assert check["pairs"] == 6 and check["sequences"] == 12
    frame = open_cache(cache_dir).read()
    longest = max(frame["ref_ntok_chosen"].max(), frame["ref_ntok_rejected"].max())
    assert check["seq_max"] <= logp_tolerance(longest)
    # beta1 (0.1 by default) x the mean signed drift
    assert abs(check["step0_mean_implicit_reward_vs_reference"]) <= 0.1 * logp_tolerance(longest)
    assert "start check, policy vs cached reference on 6 pairs" in result.stdout


def test_train_refuses_a_model_with_another_tokenizer(models, cache_dir, tmp_path):
    result = run_cli("train", "--cache", cache_dir, "--out", tmp_path / "r", "--model", models["teacher"], "--quiet")
    assert_one_line_error(result, "--model", "tokenizer", "differs from the cache's reference")


def test_train_refuses_both_betas_zero(cache_dir, tmp_path):
    result = run_cli("train", "--cache", cache_dir, "--out", tmp_path / "r", "--beta1", 0, "--beta2", 0)
    assert_one_line_error(result, "beta1 and beta2 are both 0")


BAD_PAIRS = {
    "missing column": ([{"prompt": "p", "chosen": "c", "reject": "r"}], ["missing column 'rejected'", "reject"]),
    "empty response": ([{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"},
                        {"id": "b", "prompt": "p", "chosen": "  ", "rejected": "r"}], ["line 2", "'b'", "'chosen' is empty"]),
    "prompt neither string nor messages": ([{"id": "z", "prompt": 42, "chosen": "c", "rejected": "r"}],
                                           ["line 1", "'prompt' must be a string or a list"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pairs_get_one_line(models, tmp_path, case):
    rows, fragments = BAD_PAIRS[case]
    pairs = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = run_cli("cache-teacher", "--pairs", pairs, "--teacher", models["teacher"], "--reference",
                     models["student"], "--out", tmp_path / "cache", "--backend", "hf")
    assert_one_line_error(result, "bad.jsonl", *fragments)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_unknown_backend(models, pairs_file, tmp_path):
    result = run_cli("cache-teacher", "--pairs", pairs_file, "--teacher", models["teacher"], "--reference",
                     models["student"], "--out", tmp_path / "cache", "--backend", "tensorrt")
    assert_one_line_error(result, "--backend tensorrt", "unknown backend")
