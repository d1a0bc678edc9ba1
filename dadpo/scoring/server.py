"""The vllm-server scoring backend: prompt log-probs from a running vLLM OpenAI-compatible server.

For teachers too large for this node. dadpo tokenizes locally (the tokenizer of --teacher) and
sends token ids; the server never tokenizes what we score. Each sequence is one request:

    POST {url}/v1/completions  {"model": M, "prompt": [ids], "max_tokens": 1,
                                "prompt_logprobs": 0, "temperature": 0}

and the answer's choices[0].prompt_logprobs holds, for every prompt position but the first, a dict
keyed by the token id as a string: {"<id>": {"logprob", "rank", "decoded_token"}}. With
prompt_logprobs=0 that is the sent token's entry (vLLM may add the top-1 when it differs; we read
the sent id's entry and check it is there). As in the offline backend, a request must generate one
token, so the longest scorable sequence is max_model_len - 1.

probe_server() runs once before scoring: which model, which vLLM, its context length, and whether
its tokenizer and vocabulary agree with the local tokenizer. The HTTP (urllib: no dependency beyond
dadpo's own), the server's key and the URL's credentials: dadpo.scoring.client.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from dadpo.errors import DadpoError
from dadpo.scoring.base import Scorer, TokenizedSequence
from dadpo.scoring.client import Http, Refused, one_line, run_concurrently

_Http = Http  # the served client, also known by this name here
_CLAMPED_NEG_INF = -9999.0
# Ids the gallop in _vocab_size may try before deciding the server checks none (2**31).
_MAX_TOKEN_ID = 2**31 - 1
# Texts whose tokenization must agree between the server and the local tokenizer: ASCII, digits,
# whitespace runs, accents, CJK, emoji, code; the local special tokens are added to them.
_SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42!",
    "  two  spaces,\ttab,\nnew line;\n\n  indented (parentheses) \"quotes\" 'single'",
    "Über, jalapeño, crème brûlée, façade, naïve résumé; déjà vu.",
    "日本語のテキスト。東京は日本の首都です。 Emoji: 🙂 🚀 ❤️ 👍",
    "def add(a, b):\n    return a + b  # 0x1F 3.14159 1e-9",
)


def _completion_request(served_model: str | None, ids: list[int], prompt_logprobs: bool) -> dict:
    payload: dict = {"prompt": ids, "max_tokens": 1, "temperature": 0}
    if prompt_logprobs:
        payload["prompt_logprobs"] = 0
    if served_model is not None:
        payload["model"] = served_model
    return payload


class ServerScorer(Scorer):
    """Scores token-id sequences through a running vLLM server (see probe_server first).

    tokenizer_vocab_size: ids must lie in [0, this): the local tokenizer's size, or the vocab_size
    of probe_server's record (the ids the server accepts), so a bad id is refused before sending.
    max_length: the longest sequence (prompt + response tokens) sent; at most the server's
    max_model_len - 1. None leaves the check to the server (its refusal is one DadpoError).
    api_key, key_source: the server's key and where it came from (see dadpo.scoring.client.Http)."""

    backend = "vllm-server"

    def __init__(self, url: str, *, tokenizer_vocab_size: int, max_length: int | None,
                 served_model: str | None = None, concurrency: int = 8, timeout_s: float = 120,
                 retries: int = 5, backoff_s: float = 1.0, where: str = "--teacher-url",
                 api_key: str | None = None, key_source: str | None = None):
        if concurrency < 1:
            raise DadpoError(f"{where}: concurrency must be at least 1, got {concurrency}")
        self._http = Http(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, where=where,
                           api_key=api_key, key_source=key_source)
        self.url = self._http.url
        self.vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.served_model = served_model
        self.concurrency = concurrency
        self._version: str | None = None

    def score(self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None) -> np.ndarray:
        result = np.zeros(len(sequences), dtype=np.float64)
        todo: list[tuple[int, list[int], int]] = []  # (index, ids, number of prompt tokens)
        for i, (prompt_ids, response_ids) in enumerate(sequences):
            if len(response_ids) == 0:
                continue  # empty sum
            ids = [int(t) for t in prompt_ids] + [int(t) for t in response_ids]
            if len(prompt_ids) == 0:
                raise DadpoError(f"sequence {i}: empty prompt; the first response token has no context")
            if self.max_length is not None and len(ids) > self.max_length:
                raise DadpoError(f"sequence {i}: {len(ids)} tokens, over the limit of {self.max_length} for "
                                 f"{self.url} (at most the server's max_model_len - 1)")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise DadpoError(f"sequence {i}: token id outside the vocabulary (size {self.vocab_size})")
            todo.append((i, ids, len(prompt_ids)))
        if not todo:
            return result

        def scored(done: list[tuple[int, float]]) -> None:
            for k, logprob in done:
                i, ids, _ = todo[k]
                result[i] = logprob
                if on_tokens is not None:  # progress from the caller's thread only
                    on_tokens(len(ids))

        run_concurrently(todo, lambda item, halt: self._score_one(*item, halt), scored,
                         concurrency=self.concurrency, name="dadpo-score")
        return result

    def _score_one(self, i: int, ids: list[int], n_prompt: int, stop: threading.Event) -> float:
        try:
            answer = self._http.call("/v1/completions", _completion_request(self.served_model, ids, True), stop)
        except Refused as exc:
            raise self._http.fail(f"the server refused sequence {i} ({exc})") from None
        return _response_logprob(answer, ids, n_prompt, lambda what: self._http.fail(f"sequence {i}: {what}"))

    def backend_version(self) -> str:
        if self._version is None:
            self._version = _server_version(self._http)
        return f"vllm-server {self._version}"


def _response_logprob(answer: Any, ids: list[int], n_prompt: int, fail: Callable[[str], DadpoError]) -> float:
    """Sum of the response positions' log-probs, each checked to be for the token we sent."""
    try:
        positions = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise fail("the answer has no choices[0].prompt_logprobs; is this a vLLM server?") from None
    if not isinstance(positions, list) or len(positions) != len(ids):
        count = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise fail(f"the server returned {count} prompt log-probs for {len(ids)} tokens")
    total = 0.0
    for pos in range(n_prompt, len(ids)):
        entry = positions[pos].get(str(ids[pos])) if isinstance(positions[pos], dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("logprob"), (int, float)):
            raise fail(f"the server's prompt log-prob at position {pos} is not for the token sent ({ids[pos]})")
        # vLLM's JSON answer carries -inf (a token the model rules out) as -9999.0
        # (clamp_prompt_logprobs); the other backends give -inf.
        total += -np.inf if entry["logprob"] == _CLAMPED_NEG_INF else entry["logprob"]
    return total


def _server_version(client: Http) -> str:
    try:
        answer = client.call("/version")
    except Refused as exc:
        raise client.fail(f"GET /version answered {exc}; is this a vLLM server?") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("version"), str):
        raise client.fail("GET /version did not answer {\"version\": ...}; is this a vLLM server?")
    return answer["version"]


def probe_server(url: str, *, tokenizer, max_length: int | None, served_model: str | None = None,
                 timeout_s: float = 30, retries: int = 2, backoff_s: float = 1.0, where: str = "--teacher-url",
                 tokenizer_name: str = "--teacher's tokenizer", api_key: str | None = None,
                 key_source: str | None = None) -> dict:
    """Check that the server at url can score for `tokenizer` and return the manifest's record:
    {"url", "served_model", "server_version", "max_model_len", "vocab_size"}.

    Refused (one DadpoError line): no server or not a vLLM one; served_model not served (or several
    served and none named); a server tokenizer that tokenizes sample texts differently; a model
    vocabulary that does not cover the local tokenizer's ids; max_length over max_model_len - 1.
    vocab_size is the number of token ids the server accepts in a prompt. The URL is recorded
    without credentials (redact_url); api_key and key_source as in Http."""
    client = Http(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, where=where, api_key=api_key,
                   key_source=key_source)
    try:
        models = client.call("/v1/models")
    except Refused as exc:
        raise client.fail(f"GET /v1/models answered {exc}; is this the base URL of a vLLM "
                          "OpenAI-compatible server (e.g. http://host:8000)?") from None
    cards = models.get("data") if isinstance(models, dict) else None
    if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
        raise client.fail("GET /v1/models did not answer a model list; is this a vLLM server?")
    card = _choose_model(client, cards, served_model)
    version = _server_version(client)
    name = card["id"]

    max_model_len = card.get("max_model_len")
    if not isinstance(max_model_len, int):
        raise client.fail(f"GET /v1/models gives no max_model_len for {name}; is this a vLLM server?")
    if max_length is not None and max_length > max_model_len - 1:
        raise client.fail(f"max length {max_length} is over what the server's model {name} scores: "
                          f"max_model_len {max_model_len} leaves {max_model_len - 1} tokens (vLLM generates one); "
                          f"lower the max length or restart the server with --max-model-len {max_length + 1}")
    local_size = max(tokenizer.get_vocab().values()) + 1  # ids may have holes: one past the largest
    vocab_size = _vocab_size(client, name, local_size)
    if vocab_size < local_size:
        raise client.fail(f"the server's model {name} has vocabulary {vocab_size}, {tokenizer_name} has "
                          f"{local_size}: they are not the same tokenizer")
    _check_tokenizer(client, name, tokenizer, tokenizer_name)

    return {"url": client.url, "served_model": name, "server_version": version,
            "max_model_len": max_model_len, "vocab_size": vocab_size}


def _choose_model(client: Http, cards: list[dict], served_model: str | None) -> dict:
    names = [card["id"] for card in cards]
    if served_model is not None:
        for card in cards:
            if card["id"] == served_model:
                return card
        raise client.fail(f"the server does not serve {served_model!r}; it serves {', '.join(names) or 'nothing'}")
    if len(cards) != 1:
        raise client.fail(f"the server serves {len(cards)} models ({', '.join(names) or 'none'}); name the one to use")
    return cards[0]


def _check_tokenizer(client: Http, name: str, tokenizer, tokenizer_name: str) -> None:
    """The server's /tokenize must give the local tokenizer's ids on sample texts (and on the local
    special tokens): same ids, same text, so the same tokenizer as far as dadpo can tell."""
    specials = " ".join(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    texts = [*_SAMPLE_TEXTS, f"{specials} {_SAMPLE_TEXTS[0]} {specials}".strip()]
    for text in texts:
        try:
            answer = client.call("/tokenize", {"model": name, "prompt": text, "add_special_tokens": False})
        except Refused as exc:
            raise client.fail(f"POST /tokenize answered {exc}: dadpo needs the server's tokenizer to check "
                              f"it against {tokenizer_name} (was the server started with --skip-tokenizer-init?)"
                              ) from None
        server_ids = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(server_ids, list):
            raise client.fail("POST /tokenize did not answer {\"tokens\": [...]}; is this a vLLM server?")
        local_ids = list(tokenizer.encode(text, add_special_tokens=False))
        if server_ids != local_ids:
            first = next((k for k, (a, b) in enumerate(zip(server_ids, local_ids)) if a != b),
                         min(len(server_ids), len(local_ids)))
            raise client.fail(f"the server's model {name} tokenizes {one_line(text, 40)!r} differently from "
                              f"{tokenizer_name} (from token {first}: server {server_ids[first:first + 4]}, local "
                              f"{local_ids[first:first + 4]}): they are not the same tokenizer")


def _vocab_size(client: Http, name: str, local_size: int) -> int:
    """The smallest token id the server refuses in a prompt (vLLM answers 400 "Token id N is out of
    vocabulary"; it accepts ids below max(its tokenizer's, its model's vocabulary)). Found by
    galloping up from the local tokenizer's largest id, then bisecting: a few tiny requests."""

    def accepts(token_id: int) -> bool:
        try:
            client.call("/v1/completions", _completion_request(name, [token_id], False))
        except Refused as exc:
            if exc.status != 400:
                raise client.fail(f"a one-token request to {name} answered {exc}") from None
            if token_id == 0:
                raise client.fail(f"the server refuses even token id 0 ({exc.message})") from None
            return False
        return True

    if accepts(local_size - 1):
        accepted, step = local_size - 1, 1
        while accepts(accepted + step):
            accepted += step
            step *= 2
            if accepted + step > _MAX_TOKEN_ID:
                raise client.fail(f"the server accepts token id {accepted}: it does not check token ids")
        refused = accepted + step
    else:
        accepts(0)  # raises unless the server takes some ids at all
        accepted, refused = 0, local_size - 1
    while refused - accepted > 1:
        middle = (accepted + refused) // 2
        if accepts(middle):
            accepted = middle
        else:
            refused = middle
    return refused
