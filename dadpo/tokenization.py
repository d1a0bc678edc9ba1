"""The tokenization rule, version 2 (data_specs/tokenization.v2.md): score exactly the tokens a
model emits after its generation prompt. One implementation, used by generate, sft, cache-teacher,
train (through the cached ids) and verify-cache.

For one model (tokenizer, chat template, template variables, pinned date):

    prompt    messages -> template(messages, add_generation_prompt=True, **variables), as text
              raw text (--prompt-format raw, or a model without a chat template) -> the text itself
              prompt_ids = tokenize(that text); special tokens (BOS) are added only to raw text,
              and only when the text does not already start with them
    response  response_ids = the ids the model sampled, when the pair carries them for this
              vocabulary (`dadpo generate` stores them), as they were sampled (the stop token
              included); otherwise
                  tokenize(text) + end_of_turn            (nothing appended when the response was
                                                           cut at the length limit)
              end_of_turn = the template's own text after an assistant message, up to and
              including the first token at which generation stops (eos, the generation config's
              eos ids, or the special token the template puts after a message: special as
              added_tokens_decoder marks it, listed in all_special_ids or not); eos without a
              template. The response text never passes through the template (no trim, no
              reasoning stripping): it is scored as written.
    overlap   a response that starts with what the generation prompt already ends with (a tail
              of the prompt's tokens that begins at an added token, e.g. `<think>\\n`) does not
              repeat it: that text is removed from the response first.

Both sides are tokenized separately with add_special_tokens=False, so no token spans the boundary.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field

from dadpo.errors import DadpoError, first_line, one_line

RULE_VERSION = 2
PROMPT_FORMATS = ("chat", "raw")  # how a string prompt is read: a user turn, or text ready for the model
# Text no template produces on its own and none of their filters (trim, split on </think>) touch.
_MARKER = "dadpoendofturnmarker"


@dataclass(frozen=True)
class Response:
    """One response of a pair: its text and, when `dadpo generate` sampled it, the sampled ids."""

    text: str
    token_ids: tuple[int, ...] | None = None  # the ids the model sampled, its stop token included
    token_ids_vocab: str | None = None  # vocab_digest of the tokenizer the ids belong to
    finish_reason: str = "stop"  # "length": cut at the generation limit, so no end of turn


def pair_responses(row: dict) -> tuple[Response, Response]:
    """The chosen and rejected Response of a normalised pairs row (a dict, as polars iter_rows(named=True) gives)."""
    def response(side: str) -> Response:
        ids = row.get(f"{side}_token_ids")
        return Response(row[side], None if ids is None else tuple(ids), row.get(f"{side}_token_ids_vocab"),
                        row.get(f"{side}_finish_reason") or "stop")

    return response("chosen"), response("rejected")


def special_ids(tokenizer) -> set[int]:
    """Every id the tokenizer treats as special: those `added_tokens_decoder` marks special, whatever
    list (if any) names them, and `all_special_ids`. A base model given a chat template often has its
    end-of-turn token (Llama 3's `<|eot_id|>`, Phi's `<|end|>`) special there but listed nowhere else."""
    marked = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return marked | set(tokenizer.all_special_ids)


def pinned_clock(date: str):
    """strftime_now for templates: the pinned day (midnight), whatever today is."""
    moment = _dt.datetime.fromisoformat(date)

    def strftime_now(fmt: str) -> str:
        return moment.strftime(fmt)

    return strftime_now


def today() -> str:
    return _dt.date.today().isoformat()


def check_date(value: str | None, flag: str = "--template-date") -> None:
    """YYYY-MM-DD exactly, as the manifest schema records it (date.fromisoformat alone would also take
    20240101 and 2024-W01-1)."""
    if value is None:
        return
    try:
        valid = _dt.date.fromisoformat(value).isoformat() == value
    except ValueError:
        valid = False
    if not valid:
        raise DadpoError(f"{flag} {value}: expected a date as YYYY-MM-DD, e.g. 2024-07-01")


def parse_template_kwargs(text: str | None, flag: str) -> dict:
    """'{"enable_thinking": false}' -> dict; one clear line for anything else."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DadpoError(f"{flag} {text}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DadpoError(f"{flag} {text}: expected a JSON object such as '{{\"enable_thinking\": false}}'")
    return value


def vocab_digest(tokenizer) -> str:
    """sha256 of what maps text to ids: the fast tokenizer's state and its special tokens."""
    state = {"tokenizer": json.loads(tokenizer.backend_tokenizer.to_str()),
             "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def legacy_digest(tokenizer, chat: bool) -> str:
    """The tokenizer digest that rule v1 recorded (cache schema 1), to check a policy against old caches."""
    state = {"tokenizer": json.loads(tokenizer.backend_tokenizer.to_str()),
             "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "chat_template": tokenizer.chat_template if chat else None, "mode": "chat" if chat else "plain",
             "rule_version": 1}
    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ModelTokenizer:
    """One model's side of the rule: its tokenizer, whether its chat template is used, the template's
    variables and pinned date, and the ids at which its generation stops."""

    tokenizer: object
    name: str  # how messages name the model, e.g. "--teacher Qwen/Qwen3-8B"
    chat: bool = True
    template_kwargs: dict = field(default_factory=dict)
    template_date: str | None = None  # YYYY-MM-DD, for templates that call strftime_now
    generation_eos: tuple[int, ...] = ()  # the generation config's eos ids

    def __post_init__(self):
        self.chat = self.chat and bool(getattr(self.tokenizer, "chat_template", None))
        if self.template_kwargs and not self.chat:
            raise DadpoError(f"{self.name}: template variables given, but the model is used without a chat template")
        self.date_dependent = self.chat and "strftime_now" in str(self.tokenizer.chat_template)
        if not self.date_dependent:
            self.template_date = None
        self.added_ids = frozenset(self.tokenizer.get_added_vocab().values())
        self.stop_ids = self._stop_ids()
        self.end_of_turn = self._end_of_turn()
        self.vocab = vocab_digest(self.tokenizer)

    # ---- what the manifest records ----

    @property
    def digest(self) -> str:
        """sha256 of everything that decides the ids: vocabulary, template, its variables and date, mode, rule."""
        state = {"vocab": self.vocab, "chat_template": self.tokenizer.chat_template if self.chat else None,
                 "mode": "chat" if self.chat else "plain", "template_kwargs": self.template_kwargs,
                 "template_date": self.template_date, "rule_version": RULE_VERSION}
        return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()

    def record(self) -> dict:
        return {"tokenizer_digest": self.digest, "vocab_digest": self.vocab, "chat_template": self.chat,
                "template_kwargs": self.template_kwargs, "template_date": self.template_date,
                "end_of_turn": list(self.end_of_turn), "stop_ids": list(self.stop_ids)}

    # ---- the rule ----

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        """The chat template's text for `messages`, with this model's variables and pinned date.
        Any failure of the template (a refused system turn, roles that must alternate) is one line."""
        _check_conversation(messages, where)
        variables = dict(self.template_kwargs)
        if self.date_dependent:
            variables["strftime_now"] = pinned_clock(self.template_date or today())
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **variables)
        except Exception as exc:  # jinja's TemplateError from raise_exception, and anything else the template does
            raise DadpoError(f"{where}: the chat template of {self.name} refuses this conversation "
                             f"({type(exc).__name__}: {first_line(exc)})") from None

    def encode_prompt(self, prompt: list[dict] | str, where: str) -> list[int]:
        if not isinstance(prompt, str):
            _check_conversation(prompt, where)
        if isinstance(prompt, list) and self.chat:
            text = self.render(prompt, True, where)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, list):
            if len(prompt) != 1 or prompt[0]["role"] != "user":
                raise DadpoError(f"{where}: the prompt is a {len(prompt)}-message conversation but {self.name} is used "
                                 "without a chat template (plain mode takes a single user prompt or raw text)")
            prompt = prompt[0]["content"]
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))  # a BOS already written in the text is not doubled
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def encode_response(self, response: Response, prompt_ids: list[int], where: str) -> list[int]:
        if response.token_ids is not None and response.token_ids_vocab == self.vocab and \
                self._decodes_to(response.token_ids, response.text):
            ids = list(response.token_ids)
        else:
            text = self._without_overlap(response.text, prompt_ids)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if response.finish_reason != "length":
                ids += self.end_of_turn
        if not ids:
            raise DadpoError(f"{where}: the response renders to no tokens under {self.name}")
        return ids

    def encode_conversation(self, messages: list[dict], response: str, where: str) -> list[int]:
        """The ids of prompt messages + an assistant response as one conversation, the way a reward model
        reads it: the chat template renders the whole conversation (add_generation_prompt=False), as reward
        models are trained and documented to be used. Without a chat template: prompt and response as above."""
        if not self.chat:
            prompt_ids = self.encode_prompt(messages, where)
            return prompt_ids + self.encode_response(Response(response), prompt_ids, where)
        text = self.render(messages + [{"role": "assistant", "content": response}], False, where)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_pair(self, prompt, chosen: Response, rejected: Response, where: str):
        """(prompt_ids, chosen_ids, rejected_ids): the prompt is rendered once for both responses."""
        prompt_ids = self.encode_prompt(prompt, where)
        return (prompt_ids, self.encode_response(chosen, prompt_ids, where),
                self.encode_response(rejected, prompt_ids, where))

    # ---- pieces ----

    def _decodes_to(self, ids, text: str) -> bool:
        body = list(ids)
        while body and body[-1] in self.stop_ids:
            body.pop()
        return self.decode(body) == text

    def decode(self, ids) -> str:
        """Text of sampled ids as generate stores it: special tokens kept, spaces not cleaned up."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _without_overlap(self, text: str, prompt_ids: list[int]) -> str:
        longest = ""
        for j in range(1, min(len(prompt_ids), 32) + 1):
            if prompt_ids[-j] not in self.added_ids:
                continue
            tail = self.decode(prompt_ids[-j:])
            if len(tail) > len(text):
                break
            if text.startswith(tail):
                longest = tail
        return text[len(longest):]

    def _stop_ids(self) -> tuple[int, ...]:
        ids = set(self.generation_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if self.chat:
            after = self._after_assistant_message()
            if after and after[0] in special_ids(self.tokenizer):
                ids.add(after[0])
        if not ids:
            raise DadpoError(f"{self.name}: the tokenizer has no eos token and its chat template no end-of-turn "
                             "token, so a response would never end")
        return tuple(sorted(ids))

    def _end_of_turn(self) -> tuple[int, ...]:
        if self.chat:
            after = self._after_assistant_message()
            for i, token in enumerate(after):
                if token in self.stop_ids:
                    return tuple(after[: i + 1])
        eos = self.tokenizer.eos_token_id
        return (eos if eos is not None else self.stop_ids[0],)

    def _after_assistant_message(self) -> list[int]:
        if not hasattr(self, "_after"):
            where = "finding where an assistant turn ends"
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}],
                               False, where)
            if _MARKER not in text:
                raise DadpoError(f"{self.name}: its chat template does not write an assistant message's content, so "
                                 "where an assistant turn ends cannot be found")
            self._after = list(self.tokenizer(text.split(_MARKER, 1)[1], add_special_tokens=False)["input_ids"])
        return self._after


def _check_conversation(messages, where: str) -> None:
    """What every template may take for granted: a list of {role, content} objects holding strings
    (pairs.py makes them so; this guards every other caller)."""
    if not isinstance(messages, list):
        raise DadpoError(f"{where}: a prompt must be text or a list of {{role, content}} messages, "
                         f"got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DadpoError(f"{where}: message {index} must be a {{role, content}} object holding strings, "
                             f"got {one_line(repr(message), 80)}")


def pad_id_of(tokenizer) -> int:
    """The id padding positions hold (never attended to, never scored): pad, else eos, else 0."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


DROPPED_NAME = "dropped_ids.txt"  # where a cache or an sft run lists the pairs the length rule left out


def length_rule(num_tokens: int, max_length: int | None, on_overlong: str, where: str) -> bool:
    """The length rule: True when a pair of `num_tokens` prompt+response tokens is over --max-length
    and so dropped whole (never truncated); with on_overlong="error" it stops the run instead."""
    if max_length is None or num_tokens <= max_length:
        return False
    if on_overlong == "error":
        raise DadpoError(f"{where}: {num_tokens} prompt+response tokens exceed --max-length {max_length} "
                         "(pass --on-overlong drop to skip such pairs)")
    return True
