"""Prefix sharing: a pair's prompt runs once, in a [prompt | chosen | rejected] row whose mask keeps
the two responses apart. Checked against the unshared layout and a plain full-vocabulary forward
per sequence, on the tiny Llama (teacher) and Qwen3 (student), for values and gradients; and the
start-up check against real configurations that cannot share."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dadpo.errors import DadpoError
from dadpo.layout_checks import check_packing, check_sharing, probe_pairs, sharing_support
from dadpo.logprobs import ResponseLogprobs, collate, collate_pairs, pair_sequences, shared_attention_mask

from support import assert_logps_close, naive_logprob


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def response_tokens(pairs) -> list[int]:
    """Each sequence's response length, in pair_sequences' (and the shared layout's) order."""
    return [len(r) for _, r in pair_sequences(pairs)]


def edge_pairs(pairs):
    """Real pairs, plus one-token chosen, rejected and prompt, and responses of very different lengths."""
    (p0, c0, r0), (p1, c1, r1) = pairs[0], pairs[1]
    return [*pairs[:6], (p0, c0[:1], r0), (p1, c1, r1[:1]), (p0[-1:], c1[:1], r0[:1]), (p1, c0 + c1, r1[:2])]


def load(models, family: str, attn: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32, attn_implementation=attn)


def test_collate_pairs_layout_and_mask():
    pairs = [([5, 6, 7], [8, 9], [10]), ([11], [12], [13, 14, 15])]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]  # both responses follow the prompt
    assert batch.branch.tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, 0]]
    assert batch.document.tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, -1]]
    assert batch.num_sequences == 4 and batch.num_tokens == 11 and batch.shared and not batch.packed
    # (sequence, row, column predicting the token, token): chosen_0, chosen_1, rejected_0, rejected_1;
    # the first token of either response is predicted from the prompt's last position
    predicted = sorted(zip(batch.sequence.tolist(), batch.row.tolist(), batch.position.tolist(), batch.target.tolist()))
    assert predicted == [(0, 0, 2, 8), (0, 0, 3, 9), (1, 1, 0, 12), (2, 0, 2, 10),
                         (3, 1, 0, 13), (3, 1, 2, 14), (3, 1, 3, 15)]
    allowed = shared_attention_mask(batch, "sdpa", torch.float32)
    assert allowed.dtype == torch.bool and allowed.shape == (2, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0],
                                            [1, 1, 1, 0, 0, 0],
                                            [1, 1, 1, 1, 0, 0],   # chosen sees prompt and itself
                                            [1, 1, 1, 1, 1, 0],
                                            [1, 1, 1, 0, 0, 1]]   # rejected: prompt and itself, not chosen
    assert allowed[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0],
                                            [1, 0, 1, 0, 0, 0],
                                            [1, 0, 1, 1, 0, 0],
                                            [1, 0, 1, 1, 1, 0],
                                            [0, 0, 0, 0, 0, 1]]   # padding sees only itself (no NaN row)
    additive = shared_attention_mask(batch, "eager", torch.bfloat16)  # eager adds the mask to the scores
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed) and bool((additive[~allowed] == torch.finfo(torch.bfloat16).min).all())

    packed = collate_pairs(pairs, pad_id=0, packed=True)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]] and packed.packed
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3]]
    mask = shared_attention_mask(packed, "sdpa", torch.float32)[0, 0]
    assert not mask[6:, :6].any() and torch.equal(mask[:6, :6], allowed[0, 0])  # pairs never see each other
    assert torch.equal(mask[6:, 6:], allowed[1, 0, :5, :5])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["teacher", "student"])  # tiny Llama, tiny Qwen3
def test_shared_logprobs_equal_unshared_and_a_plain_forward(models, tokenized_pairs, family, attn):
    pairs = edge_pairs(tokenized_pairs[family])
    lm = load(models, family, attn).eval()
    logprobs = ResponseLogprobs(lm, chunk_tokens=64)
    with torch.no_grad():
        unshared = logprobs(collate(pair_sequences(pairs), pad_id=0))
        for packed in (False, True):
            batch = collate_pairs(pairs, pad_id=0, packed=packed)
            assert batch.num_tokens == sum(len(p) + len(c) + len(r) for p, c, r in pairs)  # each prompt once
            shared = logprobs(batch)
            # fp32 sums of differently shaped computations differ by ~1e-6 nats a token
            assert_logps_close(shared, unshared, response_tokens(pairs), f"shared vs unshared (packed={packed})")
    oracle = [naive_logprob(lm, list(p), list(r)) for p, r in pair_sequences(pairs)]
    assert_logps_close(shared, oracle, response_tokens(pairs), "shared vs a plain forward")


def test_responses_would_see_each_other_without_the_branch_mask(models, tokenized_pairs):
    """The comparison above can fail: with a plain causal mask over the shared row, the rejected
    response reads the chosen one and its log-probs move far beyond the tolerance."""
    pairs = tokenized_pairs["student"][:4]
    logprobs = ResponseLogprobs(load(models, "student")).eval()
    batch = collate_pairs(pairs, pad_id=0)
    batch.branch = torch.where(batch.document >= 0, torch.ones_like(batch.branch), batch.branch)  # one branch
    with torch.no_grad():
        leaky = logprobs(batch)
        unshared = logprobs(collate(pair_sequences(pairs), pad_id=0))
    # chosen comes first: unaffected
    assert_logps_close(leaky[:4], unshared[:4], response_tokens(pairs)[:4], "chosen without the branch mask")
    assert float((leaky[4:] - unshared[4:]).abs().min()) > 1e-2


@pytest.mark.parametrize("family,attn,packed", [("teacher", "sdpa", False), ("student", "sdpa", True),
                                                ("student", "eager", False), ("teacher", "eager", True)])
def test_shared_gradients_equal_unshared(models, tokenized_pairs, family, attn, packed):
    pairs = edge_pairs(tokenized_pairs[family])
    lm = load(models, family, attn).train()
    logprobs = ResponseLogprobs(lm, chunk_tokens=64)
    # distinct weights per sequence: a chosen/rejected mix-up changes the gradient
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs), dtype=torch.float64)

    def gradients(batch):
        lm.zero_grad(set_to_none=True)
        (logprobs(batch) * weights).sum().backward()
        return {name: parameter.grad.clone() for name, parameter in lm.named_parameters()}

    unshared = gradients(collate(pair_sequences(pairs), pad_id=0))
    shared = gradients(collate_pairs(pairs, pad_id=0, packed=packed))
    assert set(shared) == set(unshared) and len(shared) > 10
    for name, grad in unshared.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_flex_attention_block_mask(models, tokenized_pairs):
    """flex_attention takes a BlockMask built from the same per-token arrays (compiled on CPU: slow)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    pairs = edge_pairs(tokenized_pairs["teacher"])[4:]
    with torch.no_grad():
        unshared = ResponseLogprobs(load(models, "teacher", "sdpa").eval())(collate(pair_sequences(pairs), pad_id=0))
        flex = ResponseLogprobs(load(models, "teacher", "flex_attention").eval())
        assert sharing_support(flex.model) is None
        for packed in (False, True):
            assert_logps_close(flex(collate_pairs(pairs, pad_id=0, packed=packed)), unshared, response_tokens(pairs),
                               f"flex_attention (packed={packed})")


@pytest.mark.parametrize("family", ["teacher", "student"])
def test_check_sharing_accepts_the_tiny_models(models, family):
    logprobs = ResponseLogprobs(load(models, family))
    assert sharing_support(logprobs.model) is None
    logprobs.train()
    assert check_sharing(logprobs, probe_pairs(logprobs.model.config.vocab_size), "cpu", family) < 1e-5
    assert logprobs.training  # the mode is restored


@pytest.mark.parametrize("family", ["teacher", "student"])
def test_checks_take_bf16_noise(models, family):
    """bf16 weights, or fp32 weights under bf16 autocast with compute_dtype said: the tolerance
    follows the dtype the forward computes in (layout noise ~1e-4 nats per token there)."""
    probe = probe_pairs(300)
    bf16 = ResponseLogprobs(AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.bfloat16))
    assert check_sharing(bf16, probe, "cpu", family) < 5e-3
    fp32 = ResponseLogprobs(load(models, family))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_sharing(fp32, probe, "cpu", family, compute_dtype=torch.bfloat16) < 5e-3
        assert check_packing(fp32, pair_sequences(probe), "cpu", family, compute_dtype=torch.bfloat16) < 5e-3


TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
# Real configurations whose log-probs a shared prompt would change, and why the check says so.
REFUSED = {
    # a sliding window (Mistral's default 4096) or local layers: a custom mask replaces the model's
    # own windowed mask, and a short probe would not show it, so they are refused from the config
    "mistral": (dict(model_type="mistral", num_key_value_heads=2, **TINY), {},
                "sliding attention window (4096 tokens)"),
    "gpt-neo-local": (dict(model_type="gpt_neo", vocab_size=300, hidden_size=64, num_layers=2, num_heads=2,
                           attention_types=[[["global", "local"], 1]]), {}, "it has local layers"),
    "bloom": (dict(model_type="bloom", vocab_size=300, hidden_size=64, n_layer=2, n_head=2),
              {"attn_implementation": "eager"}, "its decoder does not take position_ids"),
    "llama-paged": (dict(model_type="llama", num_key_value_heads=2, **TINY), {"attn_implementation": "paged|eager"},
                    "its attention implementation paged|eager takes no custom attention mask"),
    # Falcon's ALiBi path builds its bias from a 2D mask and raises on a 4D one
    "falcon-alibi": (dict(model_type="falcon", vocab_size=300, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=2, alibi=True), {}, "fails on a prefix-shared batch (ValueError"),
    # RoBERTa as a decoder numbers positions from padding_idx + 1, not 0: the probe's numbers differ
    "roberta-decoder": (dict(model_type="roberta", is_decoder=True, **TINY), {},
                        "computes other log-probs with a shared prompt"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_check_sharing_refuses_what_cannot_share(name):
    config_args, load_args, fragment = REFUSED[name]
    config_args = dict(config_args)
    torch.manual_seed(0)
    config = AutoConfig.for_model(config_args.pop("model_type"), **config_args)
    lm = AutoModelForCausalLM.from_config(config, **load_args)
    with pytest.raises(DadpoError) as refused:
        check_sharing(ResponseLogprobs(lm), probe_pairs(300), "cpu", f"tiny-{name}")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"prefix sharing: tiny-{name} ")
    assert fragment in message and message.endswith("run with prefix sharing off"), message


def test_a_sliding_window_would_change_the_numbers(models):
    """Why windows are refused from the config: with a window shorter than the row, the shared
    layout gives other log-probs (a window of 4096 would hide that from a short probe)."""
    config = AutoConfig.for_model("mistral", num_key_value_heads=2, sliding_window=8, **TINY)
    torch.manual_seed(0)
    logprobs = ResponseLogprobs(AutoModelForCausalLM.from_config(config)).eval()
    pairs = probe_pairs(300)
    with torch.no_grad():
        difference = (logprobs(collate_pairs(pairs, 0)) - logprobs(collate(pair_sequences(pairs), 0))).abs().max()
    assert difference > 1e-2
    assert "sliding attention window (8 tokens)" in sharing_support(logprobs.model)
