"""The hf backend against a naive one-sequence-at-a-time computation, and its prefix-shared score_pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.engine import EngineOptions
from dadpo.layout_checks import probe_pairs
from dadpo.logprobs import ResponseLogprobs, collate, pair_sequences, score_pairs
from dadpo.modeling import resolve_model
from dadpo.scoring.hf import HFScorer
from support import assert_logps_close, naive_logprob


@pytest.fixture(scope="module")
def sequences(tokenized_pairs):
    """Tokenized (prompt, response) for both models, lengths from a few to ~150 tokens."""
    return {name: [seq for p, c, r in pairs for seq in ((p, c), (p, r))][:24] for name, pairs in tokenized_pairs.items()}


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_hf_scorer_matches_naive(models, sequences, name):
    seqs = sequences[name]
    lengths = {len(p) + len(r) for p, r in seqs}
    assert max(lengths) > 2 * min(lengths)  # batches really mix lengths (padding in play)
    tok = AutoTokenizer.from_pretrained(models[name])
    scorer = HFScorer(resolve_model(str(models[name])), "float32", EngineOptions(batch_size=5, device="cpu"),
                      tok.pad_token_id)
    scored_tokens = []
    scores = scorer.score(seqs, on_tokens=scored_tokens.append)
    assert scores.dtype == np.float64 and scores.shape == (len(seqs),)
    assert sum(scored_tokens) == sum(len(p) + len(r) for p, r in seqs)
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    expected = np.array([naive_logprob(model, list(p), list(r)) for p, r in seqs])
    assert_logps_close(scores, expected, [len(r) for _, r in seqs], f"hf scorer vs naive ({name})")
    assert np.all(scores < 0)


def test_chunked_head_equals_unchunked_and_has_gradients(models, sequences):
    model = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float32)
    batch = collate(sequences["student"][:6], pad_id=3)
    whole = ResponseLogprobs(model, chunk_tokens=100_000)(batch)
    grads = {}
    for name, keep_logits_bytes in (("kept", 2**30), ("recomputed", 0)):  # logits kept for backward, or not
        chunked = ResponseLogprobs(model, chunk_tokens=7, keep_logits_bytes=keep_logits_bytes)(batch)
        # fp32 GEMMs of other shapes round differently (by ~1e-6 nats a token on some CPUs)
        assert_logps_close(chunked, whole, [len(r) for _, r in sequences["student"][:6]], f"chunked head ({name})")
        model.zero_grad()
        chunked.sum().backward()
        grads[name] = model.lm_head.weight.grad.clone()
    model.zero_grad()
    whole.sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.lm_head.weight.grad, atol=1e-5, rtol=1e-5, msg=name)


def hf_scorer(path, pad_id: int, batch_size: int = 5) -> HFScorer:
    return HFScorer(resolve_model(str(path)), "float32", EngineOptions(batch_size=batch_size, device="cpu"), pad_id)


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_score_pairs_shares_prompts_and_equals_score(models, tokenized_pairs, name):
    pairs = tokenized_pairs[name][:13]
    scorer = hf_scorer(models[name], AutoTokenizer.from_pretrained(models[name]).pad_token_id)
    counted = []
    chosen, rejected = scorer.score_pairs(pairs, on_tokens=counted.append)
    assert scorer.sharing_refused is None  # the tiny Llama and Qwen3 take the shared layout
    expected = scorer.score(pair_sequences(pairs))
    assert chosen.dtype == rejected.dtype == np.float64 and chosen.shape == rejected.shape == (13,)
    assert_logps_close(chosen, expected[:13], [len(c) for _, c, _ in pairs], "shared prompts: chosen")
    assert_logps_close(rejected, expected[13:], [len(r) for _, _, r in pairs], "shared prompts: rejected")
    assert len(counted) == 7  # batch_size 5 sequences: 2 pairs per batch
    assert sum(counted) == sum(len(p) + len(r) for p, r in pair_sequences(pairs))  # what score() reports


def test_score_pairs_falls_back_to_unshared(tmp_path):
    """A Mistral with an 8-token sliding window would get other numbers from the shared layout:
    the scorer notices from its config, says why, and scores the pairs unshared."""
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=128, sliding_window=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    scorer = hf_scorer(tmp_path / "mistral", pad_id=0)
    pairs = probe_pairs(300)
    chosen, rejected = scorer.score_pairs(pairs)
    assert scorer.sharing_refused.startswith(f"prefix sharing: {tmp_path / 'mistral'} cannot share prompts: it uses "
                                             "a sliding attention window (8 tokens)")
    expected = scorer.score(pair_sequences(pairs))
    assert_logps_close(np.concatenate([chosen, rejected]), expected, [len(r) for _, r in pair_sequences(pairs)],
                       "unshared fallback")
    shared_chosen, shared_rejected = score_pairs(scorer.logprobs, pairs, 0, "cpu", shared=True)
    assert np.abs(np.concatenate([shared_chosen, shared_rejected]) - expected).max() > 1e-2  # sharing would be wrong
