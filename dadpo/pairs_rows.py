"""The rules for one row of pairs (spec "pairs v2": data_specs/pairs.v2.md): which TRL layout it
comes in, its prompt and responses, and its optional response columns. Every problem is one
DadpoError line naming `where` (file, row, id) and the column.
"""

from __future__ import annotations

import os
from itertools import zip_longest

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dadpo.errors import DadpoError
from dadpo.pairs_sources import ABSENT, Chunk, type_name
from dadpo.specs import load_spec

SIDES = ("chosen", "rejected")
RESPONSE_COLUMNS = tuple(f"{side}_{name}" for side in SIDES for name in ("token_ids", "token_ids_vocab", "finish_reason"))
TOKEN_IDS = pa.list_(pa.int32())  # how the normalised file stores token ids

# The format's rules come from its versioned spec (data_specs/pairs.v2.schema.json).
_SPEC = load_spec("pairs.v2.schema.json")
REQUIRED_COLUMNS = tuple(_SPEC["required"])  # chosen, rejected: the prompt may be implicit
ALLOWED_ROLES = tuple(_SPEC["$defs"]["message"]["properties"]["role"]["enum"])
FINISH_REASONS = tuple(reason for reason in _SPEC["$defs"]["finish_reason"]["enum"] if reason is not None)
MAX_TOKEN_ID = _SPEC["$defs"]["token_ids"]["items"]["maximum"]


def _absent_or_null(value, column: str, where: str) -> None:
    if value is ABSENT or value is None:
        raise DadpoError(f"{where}: {column!r} is {'missing' if value is ABSENT else 'null'}")


def normalize_id(value, where: str) -> str:
    if value is None:
        raise DadpoError(f"{where}: 'id' is null (give every row an id, or drop the column)")
    if isinstance(value, int) and not isinstance(value, bool):  # True as an id is surely a mistake
        return str(value)
    if not isinstance(value, str):
        raise DadpoError(f"{where}: 'id' must be a string or an integer, got {type_name(value)}")
    if not value.strip():
        raise DadpoError(f"{where}: 'id' is empty")
    return value


def _messages(value: list, column: str, where: str) -> list[dict]:
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DadpoError(f"{where}: {column!r} message {index} must be a {{role, content}} object, "
                             f"got {type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ALLOWED_ROLES:
            problem = "no role" if role is None else f"unknown role {role!r}"
            raise DadpoError(f"{where}: {column!r} message {index} has {problem} (allowed: {', '.join(ALLOWED_ROLES)})")
        if not isinstance(content, str):
            raise DadpoError(f"{where}: {column!r} message {index} 'content' must be a string, got {type_name(content)}")
        messages.append({"role": role, "content": content})  # reduced to role and content
    return messages


def _text(value: str, column: str, where: str) -> str:
    if not value.strip():
        raise DadpoError(f"{where}: {column!r} is empty")
    return value


def _string_prompt(text: str, prompt_format: str) -> list[dict] | str:
    return [{"role": "user", "content": text}] if prompt_format == "chat" else text


def _prompt(value, where: str, prompt_format: str) -> list[dict] | str:
    """An explicit `prompt`: messages, or a string (a user turn, or raw text under prompt_format raw)."""
    if isinstance(value, str):
        return _string_prompt(_text(value, "prompt", where), prompt_format)
    if not isinstance(value, list):
        raise DadpoError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, "
                         f"got {type_name(value)}")
    messages = _messages(value, "prompt", where)
    # An assistant turn may be empty; a prompt with nothing to say may not.
    if not any(message["content"].strip() for message in messages):
        raise DadpoError(f"{where}: 'prompt' is empty")
    return messages


def _response(value, column: str, where: str) -> str:
    """A response after an explicit prompt: a string or a one-message assistant list."""
    _absent_or_null(value, column, where)
    expected = f"{where}: {column!r} must be a string or a one-message assistant list"
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            got = f"a list of {len(value)} messages" if len(value) != 1 else f"a list holding {type_name(value[0])}"
            raise DadpoError(f"{expected}, got {got}")
        role, value = value[0].get("role"), value[0].get("content")
        if role != "assistant":
            raise DadpoError(f"{where}: {column!r} message has role {role!r}; expected 'assistant'")
        if not isinstance(value, str):
            raise DadpoError(f"{where}: {column!r} message 'content' must be a string, got {type_name(value)}")
    elif not isinstance(value, str):
        raise DadpoError(f"{expected}, got {type_name(value)}")
    return _text(value, column, where)


def _conversation(value: list, column: str, where: str) -> list[dict]:
    messages = _messages(value, column, where)
    if not messages:
        raise DadpoError(f"{where}: {column!r} holds no messages")
    if messages[-1]["role"] != "assistant":
        raise DadpoError(f"{where}: {column!r} message {len(messages) - 1} has role {messages[-1]['role']!r}; "
                         "expected 'assistant' (a conversation ends with the response)")
    return messages


def _first_difference(left: list, right: list) -> int | None:
    return next((index for index, (a, b) in enumerate(zip_longest(left, right)) if a != b), None)


def _explicit(prompt, chosen, rejected) -> bool:
    """A prompt column with responses that are not whole conversations (TRL's explicit layouts)."""
    return prompt is not ABSENT and not any(isinstance(v, list) and len(v) > 1 for v in (chosen, rejected))


def _from_conversations(prompt, chosen, rejected, where: str) -> tuple[list[dict], str, str]:
    """Whole conversations: the prompt is the messages before the last (assistant) turn, which the two
    must share; a `prompt` column, when there is one, must agree with them."""
    for column, value, other, other_value in (("chosen", chosen, "rejected", rejected),
                                              ("rejected", rejected, "chosen", chosen)):
        _absent_or_null(value, column, where)
        if isinstance(value, list) and not isinstance(other_value, list):
            _absent_or_null(other_value, other, where)
            raise DadpoError(f"{where}: {column!r} holds a conversation of {len(value)} messages but {other!r} is a "
                             f"{type_name(other_value)}; give both as conversations ending with the response, or "
                             "each as a string or one assistant message after a 'prompt'")
    conversations = [_conversation(value, column, where) for column, value in zip(SIDES, (chosen, rejected))]
    prefix = conversations[0][:-1]
    differ = _first_difference(prefix, conversations[1][:-1])
    if differ is not None:
        raise DadpoError(f"{where}: 'chosen' and 'rejected' differ at message {differ}, before their last "
                         "assistant turn; the two conversations must share everything up to the response")
    if prompt is ABSENT:
        if not prefix:
            raise DadpoError(f"{where}: no 'prompt', and the conversations hold nothing before the response")
    elif isinstance(prompt, str):  # ultrafeedback_binarized: the prompt is the last user message
        users = [message["content"] for message in prefix if message["role"] == "user"]
        if not users or users[-1] != prompt:
            raise DadpoError(f"{where}: 'prompt' is not the last user message of the conversation in 'chosen'")
    elif isinstance(prompt, list):
        differ = _first_difference(_messages(prompt, "prompt", where), prefix[:len(prompt)])
        if differ is not None:
            raise DadpoError(f"{where}: 'prompt' and the conversation in 'chosen' differ at message {differ}; "
                             "a message-list prompt must be how the conversation starts")
    else:
        raise DadpoError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, "
                         f"got {type_name(prompt)}")
    if not any(message["content"].strip() for message in prefix):
        raise DadpoError(f"{where}: 'prompt' is empty")
    return prefix, *(_text(messages[-1]["content"], column, where) for column, messages in zip(SIDES, conversations))


def _implicit(chosen: str, rejected: str, where: str, prompt_format: str) -> tuple[list[dict] | str, str, str]:
    """TRL's implicit prompt: the longest common prefix of the two strings; a space just before the
    first difference goes to the responses."""
    for column, value in zip(SIDES, (chosen, rejected)):
        _absent_or_null(value, column, where)
        if not isinstance(value, str):
            raise DadpoError(f"{where}: {column!r} must be a string or a list of messages, got {type_name(value)}")
    shared = len(os.path.commonprefix([chosen, rejected]))
    if shared and chosen[shared - 1] == " ":
        shared -= 1
    if not chosen[:shared].strip():
        raise DadpoError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no prefix to take as the prompt")
    for column, text in zip(SIDES, (chosen, rejected)):
        if not text[shared:].strip():
            raise DadpoError(f"{where}: no 'prompt', and nothing of {column!r} is left after the prefix the "
                             "two responses share")
    return _string_prompt(chosen[:shared], prompt_format), chosen[shared:], rejected[shared:]


def pair(prompt, chosen, rejected, where: str, prompt_format: str) -> tuple[list[dict] | str, str, str]:
    """(prompt, chosen text, rejected text) of one row, whichever TRL layout it comes in."""
    if _explicit(prompt, chosen, rejected):
        return _prompt(prompt, where, prompt_format), _response(chosen, "chosen", where), \
            _response(rejected, "rejected", where)
    if prompt is ABSENT and not isinstance(chosen, list) and not isinstance(rejected, list):
        return _implicit(chosen, rejected, where, prompt_format)
    return _from_conversations(prompt, chosen, rejected, where)


def prompt_only(prompt, chosen, rejected, where: str, prompt_format: str) -> list[dict] | str:
    """The prompt of a prompts-file row: its `prompt`, or the one its pair layout implies."""
    if _explicit(prompt, chosen, rejected):
        return _prompt(prompt, where, prompt_format)
    if prompt is ABSENT and chosen is ABSENT and rejected is ABSENT:
        raise DadpoError(f"{where}: 'prompt' is missing")
    return pair(prompt, chosen, rejected, where, prompt_format)[0]


# ---- the optional response columns of one chunk ---------------------------------------------------


def _first_bad_token_ids(values: list) -> tuple[int, str] | None:
    for index, value in enumerate(values):
        if value is None or value is ABSENT:
            continue
        if not isinstance(value, list):
            return index, f"must be a list of token ids, got {type_name(value)}"
        if not value:
            return index, "is empty"
        for position, token in enumerate(value):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
                return index, f"item {position} is {token!r}, not a token id (an integer from 0 to {MAX_TOKEN_ID})"
    return None


def _token_id_array(chunk: Chunk, column: str) -> tuple[pa.Array, tuple[int, str] | None]:
    """One chunk's token-id column as list<int32> (null where absent), checked as a whole arrow column
    (a Python loop over millions of ids would dominate the load), and its first bad row if any."""
    count = len(chunk.positions)
    if column not in chunk.names:
        return pa.nulls(count, TOKEN_IDS), None
    try:
        array = chunk.table.column(column).combine_chunks() if chunk.table is not None else \
            pa.array([None if value is ABSENT else value for value in chunk.values(column)])
        if pa.types.is_null(array.type):
            return pa.nulls(count, TOKEN_IDS), None
        flat, lengths = array.flatten(), pc.list_value_length(array)
        low_high = pc.min_max(flat)
        if ((pa.types.is_integer(flat.type) or pa.types.is_null(flat.type)) and not pc.any(pc.equal(lengths, 0)).as_py()
                and (len(flat) == 0 or (low_high["min"].as_py() >= 0 and low_high["max"].as_py() <= MAX_TOKEN_ID))):
            return array.cast(TOKEN_IDS), None
    except (pa.ArrowException, AttributeError, TypeError, ValueError, OverflowError):  # not a list of integers
        pass
    values = chunk.values(column)  # the slow walk, to name the first bad row
    bad = _first_bad_token_ids(values)
    good = values if bad is None else values[:bad[0]]  # the rows before it still need their ids
    return pa.array([None if value is ABSENT else value for value in good] + [None] * (count - len(good)),
                    TOKEN_IDS), bad


class ChunkResponses:
    """The optional response columns of one chunk: token ids checked as whole columns, the rest per row."""

    def __init__(self, chunk: Chunk):
        self.arrays, self.bad = {}, None
        for column in RESPONSE_COLUMNS:
            if column.endswith("_token_ids"):
                self.arrays[column], bad = _token_id_array(chunk, column)
                if bad is not None and (self.bad is None or bad[0] < self.bad[0]):
                    self.bad = (bad[0], f"{column!r} {bad[1]}")
            else:
                self.arrays[column] = [None if value is ABSENT else value for value in chunk.values(column)]
        self.ids = {column: (np.asarray(array.offsets), np.asarray(array.values), array.is_valid().to_numpy(False))
                    for column, array in self.arrays.items() if column.endswith("_token_ids")}

    def row(self, index: int, where: str) -> tuple[dict, bytes]:
        """Checks row `index`; returns its present response fields (token ids as their count) and the
        ids as little-endian int32 bytes, which the fingerprint takes."""
        if self.bad is not None and self.bad[0] == index:
            raise DadpoError(f"{where}: {self.bad[1]}")
        fields, data = {}, b""
        for side in SIDES:
            ids_column, vocab_column, reason_column = (f"{side}_{name}" for name in
                                                       ("token_ids", "token_ids_vocab", "finish_reason"))
            vocab, reason = self.arrays[vocab_column][index], self.arrays[reason_column][index]
            offsets, values, valid = self.ids[ids_column]
            if vocab is not None and not (isinstance(vocab, str) and vocab.strip()):
                raise DadpoError(f"{where}: {vocab_column!r} must be a non-empty string, got {vocab!r}")
            if bool(valid[index]) != (vocab is not None):
                raise DadpoError(f"{where}: {ids_column!r} and {vocab_column!r} go together: give both or neither")
            if reason is not None and reason not in FINISH_REASONS:
                raise DadpoError(f"{where}: {reason_column!r} must be {' or '.join(FINISH_REASONS)} (or null), "
                                 f"got {reason!r}")
            if valid[index]:
                start, end = offsets[index], offsets[index + 1]
                fields[ids_column], fields[vocab_column] = int(end - start), vocab
                data += values[start:end].astype("<i4", copy=False).tobytes()
            if reason is not None:
                fields[reason_column] = reason
        return fields, data

    def columns(self) -> list[pa.Array]:
        return [array if column.endswith("_token_ids") else pa.array(array, pa.string())
                for column, array in self.arrays.items()]
