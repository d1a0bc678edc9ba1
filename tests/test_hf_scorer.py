"""The hf backend against a naive one-sequence-at-a-time computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.logprobs import ResponseLogprobs, collate
from dadpo.modeling import resolve_model
from dadpo.pairs import prompt_messages
from dadpo.engine import EngineOptions
from dadpo.scoring.hf import HFScorer
from dadpo.tiny import make_tiny_pairs
from dadpo.pairs import load_pairs
from dadpo.tokenization import tokenize_example


def naive_logprob(model, prompt_ids, response_ids) -> float:
    """log pi(response | prompt) from a full-vocabulary forward pass on one unpadded sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)
    start = len(prompt_ids)
    return float(sum(logprobs[start + i - 1, token] for i, token in enumerate(response_ids)))


@pytest.fixture(scope="module")
def sequences(models, pairs_file):
    """Tokenized (prompt, response) for both models, lengths from a few to ~150 tokens."""
    pairs = load_pairs(pairs_file)
    result = {}
    for name in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(models[name])
        seqs = []
        for prompt_json, chosen, rejected in pairs.frame.select("prompt", "chosen", "rejected").iter_rows():
            for response in (chosen, rejected):
                seqs.append(tokenize_example(tok, prompt_messages(prompt_json), response, chat=True))
        result[name] = seqs[:24]
    return result


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_hf_scorer_matches_naive(models, sequences, name):
    seqs = sequences[name]
    lengths = {len(p) + len(r) for p, r in seqs}
    assert max(lengths) > 2 * min(lengths)  # batches really mix lengths (padding in play)
    tok = AutoTokenizer.from_pretrained(models[name])
    scorer = HFScorer(ModelSpec(str(models[name]), dtype="float32"), EngineOptions(batch_size=5, device="cpu"),
                      resolve_model(str(models[name])), tok.pad_token_id)
    scored_tokens = []
    scores = scorer.score(seqs, on_tokens=scored_tokens.append)
    assert scores.dtype == np.float64 and scores.shape == (len(seqs),)
    assert sum(scored_tokens) == sum(len(p) + len(r) for p, r in seqs)
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    expected = np.array([naive_logprob(model, list(p), list(r)) for p, r in seqs])
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
    assert np.all(scores < 0)


def test_chunked_head_equals_unchunked_and_has_gradients(models, sequences):
    model = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float32)
    batch = collate(sequences["student"][:6], pad_id=3)
    whole = ResponseLogprobs(model, chunk_tokens=100_000)(batch)
    chunked = ResponseLogprobs(model, chunk_tokens=7)(batch)  # many chunks, checkpointed under grad
    # fp32 GEMMs of other shapes round differently (by ~1e-6 nats on some CPUs): an fp32 tolerance
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-5)
    chunked.sum().backward()
    grads_chunked = model.lm_head.weight.grad.clone()
    model.zero_grad()
    whole.sum().backward()
    torch.testing.assert_close(grads_chunked, model.lm_head.weight.grad, atol=1e-5, rtol=1e-5)
