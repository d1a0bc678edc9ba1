"""The one tokenization rule (data_specs/tokenization.md). Every backend and the trainer use it.

Chat mode (the tokenizer has a chat template, and the user did not pass --no-chat-template):
    P = template(prompt messages, add_generation_prompt=True)          as text
    F = template(prompt messages + [assistant: response])              as text
    F must start with P.
    prompt_ids   = tokenize(P,          add_special_tokens=False)
    response_ids = tokenize(F[len(P):], add_special_tokens=False)
  so end-of-turn tokens belong to the response, and no token spans the prompt/response
  boundary (this matters for templates whose generation prompt ends in a space).

Plain mode (no chat template, or --no-chat-template):
    prompt_ids   = tokenize(prompt text)  with the tokenizer's own special tokens (e.g. BOS)
    response_ids = tokenize(response, add_special_tokens=False) + [eos]

log pi(y|x) is then the sum over response_ids of the fp32 log-softmax at the previous position.
"""

from __future__ import annotations

import hashlib
import json

from dadpo.errors import DadpoError

RULE_VERSION = 1


def uses_chat_template(tokenizer, no_chat_template: bool = False) -> bool:
    """Chat mode iff the tokenizer carries a chat template and the user did not opt out."""
    return bool(getattr(tokenizer, "chat_template", None)) and not no_chat_template


def tokenize_example(
    tokenizer,
    prompt: list[dict],
    response: str,
    chat: bool,
    where: str = "",
) -> tuple[list[int], list[int]]:
    """Return (prompt_ids, response_ids) for one prompt/response under the rule above.

    `prompt` is a list of {role, content} messages (dadpo.pairs normalises string prompts to
    one user message). `where` names the pair and model for error messages.
    """
    if chat:
        return _tokenize_chat(tokenizer, prompt, response, where)
    return _tokenize_plain(tokenizer, prompt, response, where)


def encode_prompt(tokenizer, prompt: list[dict], chat: bool, where: str = "") -> list[int]:
    """The prompt ids alone, exactly as tokenize_example makes them (for generation)."""
    if chat:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    _check_plain_prompt(prompt, where)
    return list(tokenizer(prompt[0]["content"])["input_ids"])


def _check_plain_prompt(prompt, where):
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        raise DadpoError(
            f"{where}: the prompt is a {len(prompt)}-message conversation but the model is used "
            "without a chat template (plain mode takes a single user prompt)"
        )


def _tokenize_chat(tokenizer, prompt, response, where):
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise DadpoError(
            f"{where}: the chat template's rendering of the conversation does not start with its "
            "rendering of the prompt (add_generation_prompt=True), so the response cannot be "
            "separated; pass --no-chat-template or fix the template"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise DadpoError(f"{where}: the response renders to no tokens")
    return list(prompt_ids), list(response_ids)


def _tokenize_plain(tokenizer, prompt, response, where):
    _check_plain_prompt(prompt, where)
    if tokenizer.eos_token_id is None:
        raise DadpoError(f"{where}: plain mode needs an eos token and the tokenizer has none")
    prompt_ids = tokenizer(prompt[0]["content"])["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(response_ids) + [tokenizer.eos_token_id]


def tokenizer_digest(tokenizer, chat: bool) -> str:
    """sha256 of everything that decides token ids: the vocabulary and merges (the fast
    tokenizer's serialised state), special tokens, the chat template and the mode."""
    state = {
        "tokenizer": json.loads(tokenizer.backend_tokenizer.to_str())
        if getattr(tokenizer, "is_fast", False)
        else sorted(tokenizer.get_vocab().items()),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template if chat else None,
        "mode": "chat" if chat else "plain",
        "rule_version": RULE_VERSION,
    }
    encoded = json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()
