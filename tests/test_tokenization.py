"""Tokenization rule v2 on the tiny tokenizers and on templates that behave like real ones, each
checked against an independent computation (the template rendered and tokenized here, by hand)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dadpo.errors import DadpoError
from dadpo.modeling import model_tokenizer, resolve_model
from dadpo.tokenization import Response
from dadpo.tokenization import vocab_digest

CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the word 'apple'."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Spell café in upper case."}],
]
RESPONSES = ["elppa", "The answer is 42.", "CAFÉ — naïve 日本語 🚀"]
Q = [{"role": "user", "content": "q"}]


def rule(path, **kwargs):
    return model_tokenizer(resolve_model(str(path)), "--teacher", **kwargs)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tokenizers(models):
    return {name: AutoTokenizer.from_pretrained(models[name]) for name in ("teacher", "student")}


@pytest.mark.parametrize("name", ["teacher", "student"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_prompt_is_the_generation_prompt_and_response_its_own_tokens_plus_end_of_turn(models, tokenizers, name, case):
    tok, model = tokenizers[name], rule(models[name])
    prompt, response = CONVERSATIONS[case], RESPONSES[case]
    prompt_ids, chosen_ids, _ = model.encode_pair(prompt, Response(response), Response("x"), "here")
    generation_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert prompt_ids == ids(tok, generation_prompt)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>" if name == "teacher" else "</s>")
    # the end of turn is the stop token itself: what the template writes after it ("\n") is never generated
    assert chosen_ids == ids(tok, response) + [end_of_turn]
    assert tok.decode(chosen_ids[:-1]) == response


def test_generation_prompt_ending_in_space_does_not_merge_across_the_boundary(models, tokenizers):
    tok = tokenizers["student"]
    prompt_text = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith("<|assistant|> ")
    prompt_ids = rule(models["student"]).encode_prompt(CONVERSATIONS[0], "here")
    whole = ids(tok, prompt_text + "The answer")
    assert whole[: len(prompt_ids)] != prompt_ids  # tokenized at once, the space fuses into "▁The"
    assert tok.convert_ids_to_tokens(prompt_ids[-1]) == "▁"


def test_no_doubled_bos(models, tokenizers):
    tok, model = tokenizers["student"], rule(models["student"])
    for prompt in (CONVERSATIONS[0], "raw text", "<s>raw text with its own BOS"):
        prompt_ids = model.encode_prompt(prompt, "here")
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1, prompt
    plain = rule(models["student"], no_chat_template=True)
    assert plain.encode_prompt(CONVERSATIONS[0], "here").count(tok.bos_token_id) == 1


def test_plain_mode(models, tokenizers):
    for name, tok in tokenizers.items():
        plain = rule(models[name], no_chat_template=True)
        prompt_ids, response_ids, _ = plain.encode_pair(CONVERSATIONS[0], Response("elppa naïve"), Response("x"), "h")
        assert prompt_ids == tok(CONVERSATIONS[0][0]["content"])["input_ids"]  # the tokenizer's own specials
        assert response_ids == ids(tok, "elppa naïve") + [tok.eos_token_id]
    with pytest.raises(DadpoError, match="plain mode takes a single user prompt"):
        rule(models["teacher"], no_chat_template=True).encode_prompt(CONVERSATIONS[1], "p.jsonl row id 'q'")


def test_raw_prompts_are_text_as_given(models, tokenizers):
    tok = tokenizers["teacher"]
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rule(models["teacher"]).encode_prompt(text, "here") == tok(text)["input_ids"]


def test_non_ascii_round_trips(models, tokenizers):
    text = "CAFÉ — naïve 日本語 🚀 ¿qué?"
    for name, tok in tokenizers.items():
        model = rule(models[name])
        response_ids = model.encode_response(Response(text), model.encode_prompt(Q, "h"), "h")
        assert tok.decode(response_ids[:-1]) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in response_ids


def test_cut_responses_get_no_end_of_turn_and_sampled_ids_are_kept(models, tokenizers):
    tok, model = tokenizers["teacher"], rule(models["teacher"])
    prompt_ids = model.encode_prompt(Q, "h")
    assert model.encode_response(Response("question", finish_reason="length"), prompt_ids, "h") == \
        ids(tok, "question")
    # a non-canonical tokenization, as a model can sample it: one byte token per character
    sampled = [tok.convert_tokens_to_ids(c) for c in "question"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert sampled[:-1] != ids(tok, "question")
    carried = Response("question", tuple(sampled), vocab_digest(tok), "stop")
    assert model.encode_response(carried, prompt_ids, "h") == sampled
    # ids of another vocabulary, or ids that no longer decode to the text, are not used
    other = Response("question", tuple(sampled), "0" * 64, "stop")
    edited = Response("questions", tuple(sampled), vocab_digest(tok), "stop")
    assert model.encode_response(other, prompt_ids, "h") == ids(tok, "question") + sampled[-1:]
    assert model.encode_response(edited, prompt_ids, "h") == ids(tok, "questions") + sampled[-1:]


# ---------------------------------------------------------------- templates that behave like real ones


def test_think_opener_and_reasoning_scored_as_written(templated):
    model = rule(templated["think"])
    tok = model.tokenizer
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "secret plan</think>\n\nHello"},
               {"role": "user", "content": "Add 2 and 2."}]
    prompt_ids = model.encode_prompt(history, "here")
    text = tok.decode(prompt_ids)
    assert text.endswith("<|im_start|>assistant\n<think>\n")  # the generation prompt opens a think block
    assert "secret plan" not in text  # the template strips reasoning from earlier turns
    reasoning = "First I add.\n</think>\n\nThe answer is 4."
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    # the response is scored as written, reasoning and all, whatever the template does to assistant turns
    assert model.encode_response(Response(reasoning), prompt_ids, "h") == ids(tok, reasoning) + end
    # a dataset that also stores the opener is not scored twice for it
    assert model.encode_response(Response("<think>\n" + reasoning), prompt_ids, "h") == ids(tok, reasoning) + end


def test_thinking_switch(templated):
    on, off = rule(templated["thinking_switch"]), rule(templated["thinking_switch"],
                                                       template_kwargs={"enable_thinking": False})
    tok = on.tokenizer
    assert tok.decode(on.encode_prompt(Q, "h")).endswith("<|im_start|>assistant\n")
    assert tok.decode(off.encode_prompt(Q, "h")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.digest != off.digest and on.record()["template_kwargs"] == {}
    # an answer without reasoning is scored as written, not as the template would render it
    answer = off.encode_response(Response("Four."), off.encode_prompt(Q, "h"), "h")
    assert tok.decode(answer) == "Four.<|im_end|>"


def test_trim_applies_to_the_prompt_not_the_response(templated):
    model = rule(templated["trim_date"], template_date="2026-03-01")
    tok = model.tokenizer
    prompt_ids = model.encode_prompt([{"role": "user", "content": "   padded question   "}], "h")
    assert "\npadded question<|im_end|>" in tok.decode(prompt_ids)
    assert tok.decode(model.encode_response(Response("  spaced answer  "), prompt_ids, "h")) == \
        "  spaced answer  <|im_end|>"


def test_date_is_pinned(templated):
    march, june = (rule(templated["trim_date"], template_date=date) for date in ("2026-03-01", "2026-06-30"))
    assert "Today Date: 01 Mar 2026" in march.tokenizer.decode(march.encode_prompt(Q, "h"))
    assert "Today Date: 30 Jun 2026" in june.tokenizer.decode(june.encode_prompt(Q, "h"))
    assert march.digest != june.digest and march.record()["template_date"] == "2026-03-01"
    # a template without a date ignores the pin
    assert rule(templated["effort"], template_date="2026-03-01").template_date is None


def test_template_variables(templated):
    default, high = rule(templated["effort"]), rule(templated["effort"], template_kwargs={"reasoning_effort": "high"})
    assert "Reasoning: medium" in default.tokenizer.decode(default.encode_prompt(Q, "h"))
    assert "Reasoning: high" in high.tokenizer.decode(high.encode_prompt(Q, "h"))


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "System role not supported"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "again"}], "roles must alternate"),
])
def test_template_refusals_are_one_line(templated, conversation, message):
    with pytest.raises(DadpoError) as error:
        rule(templated["strict_roles"]).encode_prompt(conversation, "pairs.jsonl row id 'q7'")
    text = str(error.value)
    assert "\n" not in text and "pairs.jsonl row id 'q7'" in text and "strict_roles" in text and message in text


def test_digests(models, tokenizers):
    teacher = rule(models["teacher"])
    assert teacher.digest != rule(models["teacher"], no_chat_template=True).digest
    assert teacher.digest != rule(models["student"]).digest
    assert teacher.digest == rule(models["teacher"]).digest
    assert teacher.vocab == vocab_digest(tokenizers["teacher"]) != vocab_digest(tokenizers["student"])
    with pytest.raises(DadpoError, match="without a chat template"):
        rule(models["teacher"], no_chat_template=True, template_kwargs={"enable_thinking": False})
