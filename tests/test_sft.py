"""dadpo sft on the tiny student: response-only loss, lower loss after training, a loadable HF checkpoint."""

from __future__ import annotations

import json
import signal

import polars as pl
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from support import (ENV, assert_one_line_error, assert_same_steps, cli_flags, metrics, naive_logprob, run_cli,
                     start_cli, stop_line_after_steps, write_jsonl)
from dadpo.errors import DadpoError
from dadpo.training.checkpoint import list_checkpoints
from dadpo.config import SftConfig
from dadpo.recipes.sft import sft
from dadpo.tiny import make_tiny_pairs
from dadpo.training.data import global_batch_rows, split_eval


def _mean_nll(model_dir, rows: pl.DataFrame, pad_id: int) -> float:
    """Mean NLL per response token, computed here from scratch (the plain forward of the oracle)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll = -sum(naive_logprob(model, p, r) for p, r in zip(rows["prompt_ids"].to_list(), rows["response_ids"].to_list()))
    return float(nll / rows["response_tokens"].sum())


@pytest.fixture(scope="module")
def sft_run(models, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    summary = sft(SftConfig(pairs=str(pairs_file), model=str(models["student"]), out=str(out), lr=2e-3,
                            batch_size=8, grad_accum=1, epochs=3, eval_fraction=0.1, seed=1, max_length=160,
                            progress=False))
    return out, summary


@pytest.fixture(scope="module")
def tokenized(models, pairs_file):
    """The student's (prompt, response) ids of every pair by rule v2, written out here: the rendered
    generation prompt, then the teacher's response tokens and the end-of-turn token; pairs over 160
    tokens dropped."""
    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    ids, prompts, responses, dropped = [], [], [], []
    for line in pairs_file.read_text().splitlines():
        pair = json.loads(line)
        messages = [{"role": "user", "content": pair["prompt"]}] if isinstance(pair["prompt"], str) else pair["prompt"]
        chosen = pair["chosen"] if isinstance(pair["chosen"], str) else pair["chosen"][0]["content"]
        prompt_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(response_ids) > 160:
            dropped.append(pair["id"])
            continue
        ids.append(pair["id"])
        prompts.append(prompt_ids)
        responses.append(response_ids)
    rows = pl.DataFrame({"id": ids, "prompt_ids": prompts, "response_ids": responses,
                         "response_tokens": [len(r) for r in responses]})
    return rows, dropped, tokenizer.pad_token_id


def test_loss_is_the_nll_of_the_response_tokens_only(sft_run, tokenized, models):
    """Step 1's logged loss equals the mean response-token NLL of that step's rows under the
    starting model, computed independently: prompt tokens carry no loss."""
    out, summary = sft_run
    rows, _, pad_id = tokenized
    train_rows, _ = split_eval(rows, 0.1)
    first_rows = global_batch_rows(train_rows, 0, 8, train_rows.height // 8, seed=1)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(_mean_nll(models["student"], first_rows, pad_id), rel=1e-4)
    assert first["tokens"] == int(first_rows["response_tokens"].sum())
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert key in first


def test_training_lowers_the_loss_and_the_checkpoint_loads(sft_run, tokenized, models):
    out, summary = sft_run
    rows, dropped, pad_id = tokenized
    train_rows, _ = split_eval(rows, 0.1)
    before = _mean_nll(models["student"], train_rows, pad_id)
    after = _mean_nll(out / "model", train_rows, pad_id)  # AutoModelForCausalLM.from_pretrained(RUN/model)
    assert after < 0.8 * before
    assert summary["steps"] == 3 * (train_rows.height // 8)
    assert summary["dropped_ids"] == dropped
    if dropped:
        assert (out / "dropped_ids.txt").read_text().split() == dropped
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == \
        AutoTokenizer.from_pretrained(models["student"]).chat_template


def test_cli_sft_and_its_errors(models, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(12, seed=4))
    out = tmp_path / "run"
    result = run_cli("sft", "--pairs", pairs, "--model", models["student"], "--out", out, "--lr", "1e-3",
                     "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--eval-fraction", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "trained 2 steps" in result.stdout and (out / "model" / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert_one_line_error(run_cli("sft", "--pairs", pairs, "--out", tmp_path / "x"), "--model")
    assert_one_line_error(run_cli("sft", "--pairs", pairs, "--model", models["student"], "--out", tmp_path / "y",
                                  "--max-length", "10", "--on-overlong", "error"), "exceed --max-length 10")


def test_every_pair_too_long_is_refused(models, pairs_file, tmp_path):
    with pytest.raises(DadpoError, match="every pair is longer than --max-length 8"):
        sft(SftConfig(pairs=str(pairs_file), model=str(models["student"]), out=str(tmp_path / "r"), max_length=8,
                      progress=False))


def test_a_stop_signal_checkpoints_the_step_and_resume_equals_uninterrupted(models, pairs_file, tmp_path):
    """SIGTERM to `dadpo sft`: the step in flight finishes and is checkpointed, one line, exit 75;
    --resume then logs the steps of an uninterrupted run."""
    settings = dict(pairs=str(pairs_file), model=str(models["student"]), lr=1e-3, batch_size=2, grad_accum=1,
                    max_steps=6, warmup_steps=1, eval_fraction=0.1, seed=2, max_length=160, progress=False)
    stopped = tmp_path / "stopped"
    process = start_cli("sft", "--out", stopped, "--quiet",
                        *cli_flags({k: v for k, v in settings.items() if k != "progress"}), env=ENV)
    line = stop_line_after_steps(process, stopped, 2, signal.SIGTERM)
    assert "stopped by SIGTERM" in line and "--resume" in line, line
    done = len(metrics(stopped))
    assert 2 <= done < 6 and list_checkpoints(stopped)[-1].name == f"step-{done:06d}"
    summary = sft(SftConfig(out=str(stopped), resume=True, **settings))
    assert summary["resumed_from_step"] == done
    whole = tmp_path / "whole"
    sft(SftConfig(out=str(whole), **settings))
    assert_same_steps(metrics(stopped), metrics(whole), keys=("loss", "lr", "grad_norm"), tolerance=1e-6)
