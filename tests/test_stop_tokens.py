"""The stop-token rule (data_specs/tokenization.v2.md) on a model whose end-of-turn token is special
only in added_tokens_decoder: the tiny "unlisted_end" model, a base Llama given a Phi-3-style chat
template that writes <|end|> after each message while eos stays <|endoftext|> (the real case: a base
student given a chat template for dSFT). generate stops at <|end|> (hf and vllm samplers), and
cache-teacher, sft and train score <|end|> as the response's last token; every score is checked
against a plain fp32 forward over ids built here by hand, and against eos in its place (the old rule).
Cost (measured, 2 cores under load 3-5): 2.0 min of CPU (user + sys); 4.3 min before its two vLLM
engines (sampler, scorer: two code paths, so two starts) were started lean (support.VLLM_ENV, eager).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.config import SftConfig
from dadpo.engine import EngineOptions
from dadpo.generate import GenerateConfig, generate_pairs
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.recipes.dadpo import TrainConfig, train
from dadpo.recipes.sft import sft
from dadpo.sampling import Sampling
from dadpo.tiny import UNLISTED_END, make_tiny_pairs
from dadpo.tokenization import special_ids
from dadpo.training.data import global_batch_rows, split_eval
from support import ENV, VLLM_EAGER, VLLM_ENV, metrics, naive_logprob, run_cli, shard_rows, write_jsonl

# nats per response token: fp32 sentence log-probs of differently shaped computations (hf or vLLM
# against a plain forward; vLLM measured at <= 3e-7 per token here), so <= 1e-4 per sentence here
PER_TOKEN = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the independent side


def hand_built(tokenizer, pair: dict, end: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) written out here, not by dadpo: the Phi-3 layout
    `<|role|>\\ncontent<|end|>\\n` per message then `<|assistant|>\\n`, and each response's text
    tokens followed by the token `end`."""
    prompt = pair["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = "".join(f"<|{m['role']}|>\n{m['content']}{UNLISTED_END}\n" for m in messages) + "<|assistant|>\n"
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(end)

    def response(value) -> list[int]:
        content = value if isinstance(value, str) else value[0]["content"]
        return tokenizer(content, add_special_tokens=False)["input_ids"] + [end_id]

    return prompt_ids, response(pair["chosen"]), response(pair["rejected"])


def read_pairs(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def tokenizer(unlisted_end):
    return AutoTokenizer.from_pretrained(unlisted_end)


@pytest.fixture(scope="module")
def model(unlisted_end):
    return AutoModelForCausalLM.from_pretrained(unlisted_end, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def end_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(UNLISTED_END)


# ---------------------------------------------------------------- the rule


def test_the_end_token_is_special_only_in_added_tokens_decoder_and_is_the_stop_token(unlisted_end, tokenizer, end_id):
    """The case reproduced: <|end|> is marked special where tokens are declared, yet all_special_ids
    (the old rule's only source) omits it; the rule takes it as the stop token and end of turn."""
    assert tokenizer.added_tokens_decoder[end_id].special
    assert end_id not in tokenizer.all_special_ids
    assert tokenizer.eos_token == "<|endoftext|>"
    assert end_id in special_ids(tokenizer) and set(tokenizer.all_special_ids) <= special_ids(tokenizer)
    rule = model_tokenizer(resolve_model(str(unlisted_end)), "--model")
    assert rule.stop_ids == tuple(sorted({tokenizer.eos_token_id, end_id}))
    assert rule.end_of_turn == (end_id,)  # not the "\n" the template writes after it, not eos


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rows = [{"id": p["id"], "prompt": p["prompt"]} for p in make_tiny_pairs(10, seed=13)]
    return write_jsonl(tmp_path_factory.mktemp("stop_prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def generated(prompts_file, models, unlisted_end, tmp_path_factory) -> Path:
    """Pairs sampled with the hf sampler: the tiny teacher's chosen, the unlisted_end model's rejected."""
    out = tmp_path_factory.mktemp("stop_generate") / "pairs.parquet"
    sampling = Sampling(max_new_tokens=24, temperature=1.0, seed=3)
    generate_pairs(GenerateConfig(prompts=str(prompts_file), teacher=str(models["teacher"]), student=str(unlisted_end),
                                  out=str(out), backend="hf", sampling=sampling, chunk_size=5,
                                  engine=EngineOptions(batch_size=4), progress=False))
    return out


def assert_stops_at_end(responses: list[tuple[list[int], str]], tokenizer, end_id: int) -> None:
    """Each sampled response ends at its first stop token ("stop") or runs to the limit without one
    ("length"); most end with <|end|>, as the model's output bias makes it likely after a few tokens
    (eos, <|endoftext|>, is a stop token too, and rarely sampled)."""
    stops = {end_id, tokenizer.eos_token_id}
    for ids, reason in responses:
        assert reason in ("stop", "length")
        assert (ids[-1] in stops) == (reason == "stop"), (ids, reason)
        assert not stops & set(ids[:-1]), ids
    assert sum(ids[-1] == end_id for ids, _ in responses) >= 0.7 * len(responses), responses


def test_generate_stops_sampling_at_the_end_token(generated, tokenizer, end_id):
    frame = pl.read_parquet(generated)
    responses = list(zip(frame["rejected_token_ids"].to_list(), frame["rejected_finish_reason"].to_list()))
    assert len(responses) >= 8
    assert_stops_at_end(responses, tokenizer, end_id)
    for (ids, reason), text in zip(responses, frame["rejected"].to_list()):
        body = ids[:-1] if reason == "stop" else ids
        assert text[0]["content"] == tokenizer.decode(body, skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False)


def test_cache_teacher_scores_the_sampled_end_token(generated, models, unlisted_end, model, end_id, tmp_path):
    """The generated pairs carry their sampled ids: the reference is scored on exactly those, <|end|> last."""
    out = tmp_path / "cache"
    result = run_cli("cache-teacher", "--pairs", generated, "--reference", unlisted_end, "--out", out,
                     "--backend", "hf", "--dtype", "float32", "--quiet", env=ENV)
    assert result.returncode == 0, result.stderr
    rows = shard_rows(out)
    sampled = pl.read_parquet(generated)
    by_id = dict(zip(sampled["id"].to_list(), zip(sampled["rejected_token_ids"].to_list(),
                                                  sampled["rejected_finish_reason"].to_list())))
    for row in rows.iter_rows(named=True):
        ids, reason = by_id[row["id"]]
        assert row["ref_rejected_ids"] == ids  # <|end|> last where sampling stopped there
        want = naive_logprob(model, row["ref_prompt_ids"], ids)
        assert abs(row["ref_logp_rejected"] - want) <= PER_TOKEN * len(ids)


_VLLM_SAMPLER = """
import json, sys
from dadpo.config import Sampling
from dadpo.engine import EngineOptions
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.sampling import make_sampler
if __name__ == "__main__":  # vLLM spawns processes
    model = resolve_model(sys.argv[1])
    rule = model_tokenizer(model, "--model")
    prompts = [rule.encode_prompt(p, str(i)) for i, p in enumerate(json.loads(sys.argv[2]))]
    sampler = make_sampler("vllm", model, rule, Sampling(max_new_tokens=24, temperature=1.0, seed=3), "test",
                           "float32", EngineOptions(max_model_len=256, extra=json.loads(sys.argv[3])))
    try:
        print(json.dumps(sampler.generate(prompts, [str(i) for i in range(len(prompts))])))
    finally:
        sampler.close()
"""


@pytest.mark.vllm
def test_vllm_sampler_stops_at_the_end_token(vllm_ready, unlisted_end, tokenizer, end_id, tmp_path):
    """vLLM gets the stop ids as stop_token_ids: it stops at <|end|>, though its own eos is <|endoftext|>.
    In a subprocess: importing vllm changes the process it runs in."""
    prompts = [p["prompt"] for p in make_tiny_pairs(10, seed=13)]
    script = tmp_path / "sample.py"
    script.write_text(_VLLM_SAMPLER)
    result = subprocess.run([sys.executable, str(script), str(unlisted_end), json.dumps(prompts),
                             json.dumps(VLLM_EAGER)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **VLLM_ENV, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    responses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(responses) == 10
    assert_stops_at_end(responses, tokenizer, end_id)


# ---------------------------------------------------------------- cache-teacher on text pairs


def test_cache_teacher_scores_the_end_token_after_each_response(unlisted_end_cache, unlisted_end_pairs, tokenizer,
                                                                 model, end_id):
    """The reference's cached ids are the hand-built ones (<|end|> last, where eos used to be) and its
    log-probs those of a plain fp32 forward over them; with eos appended instead they would differ."""
    pairs = read_pairs(unlisted_end_pairs)
    manifest = json.loads((unlisted_end_cache / "manifest.json").read_text())
    assert manifest["reference"]["end_of_turn"] == [end_id]
    assert manifest["reference"]["stop_ids"] == sorted({tokenizer.eos_token_id, end_id})
    rows = shard_rows(unlisted_end_cache)
    assert rows.height == len(pairs)
    for row in rows.iter_rows(named=True):
        prompt_ids, chosen_ids, rejected_ids = hand_built(tokenizer, pairs[row["id"]], UNLISTED_END)
        assert (row["ref_prompt_ids"], row["ref_chosen_ids"], row["ref_rejected_ids"]) == \
            (prompt_ids, chosen_ids, rejected_ids)
        for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            want = naive_logprob(model, prompt_ids, ids)
            assert row[f"ref_ntok_{side}"] == len(ids)
            assert abs(row[f"ref_logp_{side}"] - want) <= PER_TOKEN * len(ids)
            # the old rule: the same number of tokens, eos in <|end|>'s place, a different score
            old = naive_logprob(model, prompt_ids, ids[:-1] + [tokenizer.eos_token_id])
            assert abs(row[f"ref_logp_{side}"] - old) > 1.0


@pytest.mark.vllm
def test_cache_teacher_with_vllm_scores_the_end_token(vllm_ready, unlisted_end, unlisted_end_pairs, tokenizer, model,
                                                      end_id, tmp_path):
    out = tmp_path / "cache"
    result = run_cli("cache-teacher", "--pairs", unlisted_end_pairs, "--reference", unlisted_end, "--out", out,
                     "--backend", "vllm", "--dtype", "float32", "--vllm-arg", "enforce_eager=true", "--quiet",
                     env={**ENV, **VLLM_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = read_pairs(unlisted_end_pairs)
    rows = shard_rows(out)
    assert rows.height == len(pairs)
    for row in rows.iter_rows(named=True):
        prompt_ids, chosen_ids, rejected_ids = hand_built(tokenizer, pairs[row["id"]], UNLISTED_END)
        assert (row["ref_chosen_ids"][-1], row["ref_rejected_ids"][-1]) == (end_id, end_id)
        for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            assert row[f"ref_{side}_ids"] == ids
            assert abs(row[f"ref_logp_{side}"] - naive_logprob(model, prompt_ids, ids)) <= PER_TOKEN * len(ids)


# ---------------------------------------------------------------- sft and train


def test_sft_trains_on_the_end_token(unlisted_end, unlisted_end_pairs, tokenizer, model, tmp_path):
    """Step 1's loss is the mean NLL per response token of that step's rows under the starting model,
    over the hand-built ids (<|end|> last); eos in its place gives another loss, the same token count."""
    batch, seed = 4, 1
    run = tmp_path / "sft"
    sft(SftConfig(pairs=str(unlisted_end_pairs), model=str(unlisted_end), out=str(run), lr=1e-3, batch_size=batch,
                  grad_accum=1, max_steps=1, eval_fraction=0.1, seed=seed, progress=False))
    pairs = read_pairs(unlisted_end_pairs)
    built = {pair_id: hand_built(tokenizer, pair, UNLISTED_END)[:2] for pair_id, pair in pairs.items()}
    rows = pl.DataFrame({"id": list(built), "response_tokens": [len(c) for _, c in built.values()]})
    train_rows, _ = split_eval(rows, 0.1)
    first_ids = global_batch_rows(train_rows, 0, batch, 10**9, seed=seed)["id"].to_list()

    def mean_nll(end_token: int) -> float:
        total = sum(-naive_logprob(model, built[i][0], built[i][1][:-1] + [end_token]) for i in first_ids)
        return total / sum(len(built[i][1]) for i in first_ids)

    first = metrics(run)[0]
    assert first["tokens"] == sum(len(built[i][1]) for i in first_ids)
    assert abs(first["loss"] - mean_nll(tokenizer.convert_tokens_to_ids(UNLISTED_END))) <= PER_TOKEN
    assert abs(first["loss"] - mean_nll(tokenizer.eos_token_id)) > 0.05


def test_train_scores_the_end_token(unlisted_end_cache, unlisted_end_pairs, tokenizer, model, tmp_path):
    """Step 1 of train (the policy starts as the reference): the logged h_policy, the batch's mean of
    log p(chosen) - log p(rejected) as the policy scores them, equals the hand-built ids' values."""
    batch, seed = 4, 9
    run = tmp_path / "train"
    train(TrainConfig(cache=str(unlisted_end_cache), out=str(run), lr=1e-6, batch_size=batch, grad_accum=1,
                      max_steps=1, seed=seed, eval_fraction=0.1, progress=False))
    pairs = read_pairs(unlisted_end_pairs)
    train_rows, _ = split_eval(shard_rows(unlisted_end_cache).select("id"), 0.1)
    first_ids = global_batch_rows(train_rows, step=0, global_batch=batch, steps_per_epoch=10**9, seed=seed)["id"]

    def mean_h(end: str) -> tuple[float, int]:
        total, tokens = 0.0, 0
        for pair_id in first_ids.to_list():
            prompt_ids, chosen_ids, rejected_ids = hand_built(tokenizer, pairs[pair_id], end)
            total += naive_logprob(model, prompt_ids, chosen_ids) - naive_logprob(model, prompt_ids, rejected_ids)
            tokens += len(chosen_ids) + len(rejected_ids)
        return total / batch, tokens

    h, tokens = mean_h(UNLISTED_END)
    first = metrics(run)[0]
    assert abs(first["h_policy"] - h) <= PER_TOKEN * tokens / batch
    assert abs(first["h_ref"] - h) <= PER_TOKEN * tokens / batch
    old, _ = mean_h(tokenizer.eos_token)
    assert abs(h - old) > 0.05  # the old rule's ids (eos last) would log another h_policy
