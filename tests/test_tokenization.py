"""The one tokenization rule, on two tiny tokenizers with different chat templates."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dadpo.errors import DadpoError
from dadpo.tokenization import encode_prompt, tokenize_example, tokenizer_digest, uses_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the word 'apple'."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Spell café in upper case."}],
]
RESPONSES = ["elppa", "The answer is 42.", "CAFÉ — naïve 日本語 🚀"]


@pytest.fixture(scope="module")
def tokenizers(models):
    return {name: AutoTokenizer.from_pretrained(models[name]) for name in ("teacher", "student")}


@pytest.mark.parametrize("name", ["teacher", "student"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_mode_splits_at_the_generation_prompt(tokenizers, name, case):
    tok = tokenizers[name]
    prompt, response = CONVERSATIONS[case], RESPONSES[case]
    prompt_ids, response_ids = tokenize_example(tok, prompt, response, chat=True)
    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    # the two halves decode back to exactly the rendered prompt and the rest of the conversation
    assert tok.decode(prompt_ids) == prompt_text
    assert tok.decode(response_ids) == full_text[len(prompt_text):]
    assert encode_prompt(tok, prompt, chat=True) == prompt_ids
    # end of turn belongs to the response
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>" if name == "teacher" else "</s>")
    assert end_of_turn in response_ids and end_of_turn not in prompt_ids[-1:]


def test_generation_prompt_ending_in_space_does_not_merge_across_the_boundary(tokenizers):
    tok = tokenizers["student"]
    prompt_text = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith("<|assistant|> ")
    prompt_ids, response_ids = tokenize_example(tok, CONVERSATIONS[0], "The answer", chat=True)
    # tokenizing the whole text at once fuses the space into the response's first token ("▁The");
    # the rule keeps the prompt's own tokenization (ending in "▁"), identical to generation time
    whole = tok(prompt_text + "The answer" + "</s>\n", add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt_ids)] != prompt_ids
    assert tok.convert_ids_to_tokens(prompt_ids[-1]) == "▁"
    assert prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(response_ids).startswith("The answer")


def test_no_doubled_bos(tokenizers):
    tok = tokenizers["student"]
    for chat in (True, False):
        prompt_ids, response_ids = tokenize_example(tok, CONVERSATIONS[0], "elppa", chat=chat)
        ids = prompt_ids + response_ids
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1


def test_plain_mode(tokenizers):
    for name, tok in tokenizers.items():
        prompt_ids, response_ids = tokenize_example(tok, CONVERSATIONS[0], "elppa naïve", chat=False)
        assert prompt_ids == tok(CONVERSATIONS[0][0]["content"])["input_ids"]  # the tokenizer's own specials
        assert response_ids[-1] == tok.eos_token_id
        assert response_ids[:-1] == tok("elppa naïve", add_special_tokens=False)["input_ids"]
        assert tok.decode(response_ids[:-1]) == "elppa naïve"
    with pytest.raises(DadpoError, match="plain mode takes a single user prompt"):
        tokenize_example(tokenizers["teacher"], CONVERSATIONS[1], "x", chat=False, where="p.jsonl row id 'q'")


def test_non_ascii_round_trips(tokenizers):
    text = "CAFÉ — naïve 日本語 🚀 ¿qué?"
    for tok in tokenizers.values():
        _, response_ids = tokenize_example(tok, CONVERSATIONS[0], text, chat=False)
        assert tok.decode(response_ids[:-1]) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in response_ids


def test_template_prefix_failure_names_the_pair(tokenizers):
    tok = AutoTokenizer.from_pretrained(tokenizers["teacher"].name_or_path)
    # a template whose prompt rendering is not a prefix of the conversation's rendering
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    with pytest.raises(DadpoError, match=r"pairs.jsonl row id 'q7' \(teacher t\).*does not start with"):
        tokenize_example(tok, CONVERSATIONS[0], "x", chat=True, where="pairs.jsonl row id 'q7' (teacher t)")


def test_chat_mode_choice_and_digest(tokenizers):
    tok = tokenizers["teacher"]
    assert uses_chat_template(tok) and not uses_chat_template(tok, no_chat_template=True)
    assert tokenizer_digest(tok, True) != tokenizer_digest(tok, False)
    assert tokenizer_digest(tok, True) != tokenizer_digest(tokenizers["student"], True)
    assert tokenizer_digest(tok, True) == tokenizer_digest(AutoTokenizer.from_pretrained(tok.name_or_path), True)
