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
its tokenizer and vocabulary agree with the local tokenizer. The standard library's urllib does
the HTTP: no dependency beyond dadpo's own.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import numpy as np

from dadpo.errors import DadpoError, one_line
from dadpo.scoring.base import Scorer, TokenizedSequence

_MAX_BACKOFF_S = 30.0
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


class _Refused(Exception):
    """The server answered 4xx (not 429): bad input, never retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def normalize_url(url: str) -> str:
    """The server's base URL: no trailing slash, and no /v1 (OpenAI clients' base_url carries it)."""
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    if not base.startswith(("http://", "https://")):
        raise DadpoError(f"{url}: not an http(s) URL (e.g. http://host:8000)")
    return base


def _error_message(body: bytes) -> str:
    """The message of a vLLM/OpenAI error body ({"error": {"message"}}, or FastAPI's {"detail"})."""
    try:
        data = json.loads(body)
    except ValueError:
        return one_line(body.decode("utf-8", "replace")) or "no message"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return one_line(error["message"])
        for key in ("message", "detail"):
            if key in data:
                return one_line(data[key])
    return one_line(body.decode("utf-8", "replace"))


class _Http:
    """JSON over HTTP to one server, with timeouts and retries with exponential backoff.

    Retried: connection errors, timeouts, 5xx and 429 (busy, restarting, a proxy in between).
    Not retried: other 4xx (_Refused), and a 200 whose body is not JSON (not a vLLM server)."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, where: str):
        self.url = normalize_url(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.where = where

    def call(self, path: str, payload: dict | None = None, stop: threading.Event | None = None) -> Any:
        """GET path (payload None) or POST payload as JSON; the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        method = "GET" if payload is None else "POST"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    break  # another request already failed for good: give up quietly
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                try:
                    message = _error_message(exc.read())
                except (OSError, http.client.HTTPException):  # the error body itself was cut off
                    message = exc.reason or "no message"
                if exc.code == 429 or exc.code >= 500:
                    last_error = f"{exc.code}: {message}"
                    continue
                raise _Refused(exc.code, message) from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP
                reason = getattr(exc, "reason", None) or exc
                last_error = one_line(f"{type(reason).__name__}: {reason}")
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise DadpoError(f"{self.where} {self.url}: {method} {path} answered with something that is not "
                                 f"JSON ({one_line(body[:80].decode('utf-8', 'replace'))!r}); is this a vLLM "
                                 "OpenAI-compatible server?") from None
        raise DadpoError(f"{self.where} {self.url}: {method} {path} failed after {attempt + 1} tries "
                         f"(last error: {last_error}); is the server running?")

    def fail(self, what: str) -> DadpoError:
        return DadpoError(f"{self.where} {self.url}: {what}")


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
    max_model_len - 1. None leaves the check to the server (its refusal is one DadpoError)."""

    backend = "vllm-server"

    def __init__(self, url: str, *, tokenizer_vocab_size: int, max_length: int | None,
                 served_model: str | None = None, concurrency: int = 8, timeout_s: float = 120,
                 retries: int = 5, backoff_s: float = 1.0, where: str = "--teacher-url"):
        if concurrency < 1:
            raise DadpoError(f"{where}: concurrency must be at least 1, got {concurrency}")
        self._http = _Http(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, where=where)
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

        # Daemon worker threads, not a ThreadPoolExecutor: after Ctrl-C or an error the process can
        # exit at once, without joining threads that wait on a slow server (up to timeout_s).
        work: queue.SimpleQueue = queue.SimpleQueue()
        for item in todo:
            work.put(item)
        answers: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()  # set on the first failure: the other workers stop retrying

        def worker() -> None:
            while not stop.is_set():
                try:
                    i, ids, n_prompt = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    answers.put((i, len(ids), self._score_one(i, ids, n_prompt, stop), None))
                except BaseException as exc:  # handed to the caller's thread, raised there
                    answers.put((i, len(ids), None, exc))
                    return

        for _ in range(min(self.concurrency, len(todo))):
            threading.Thread(target=worker, name="dadpo-score", daemon=True).start()
        try:
            for _ in range(len(todo)):
                i, length, logprob, error = answers.get()
                if error is not None:
                    raise error
                result[i] = logprob
                if on_tokens is not None:  # progress from the caller's thread only
                    on_tokens(length)
        finally:
            stop.set()
        return result

    def _score_one(self, i: int, ids: list[int], n_prompt: int, stop: threading.Event) -> float:
        try:
            answer = self._http.call("/v1/completions", _completion_request(self.served_model, ids, True), stop)
        except _Refused as exc:
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


def _server_version(client: _Http) -> str:
    try:
        answer = client.call("/version")
    except _Refused as exc:
        raise client.fail(f"GET /version answered {exc}; is this a vLLM server?") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("version"), str):
        raise client.fail("GET /version did not answer {\"version\": ...}; is this a vLLM server?")
    return answer["version"]


def probe_server(url: str, *, tokenizer, max_length: int | None, served_model: str | None = None,
                 timeout_s: float = 30, retries: int = 2, backoff_s: float = 1.0, where: str = "--teacher-url",
                 tokenizer_name: str = "--teacher's tokenizer") -> dict:
    """Check that the server at url can score for `tokenizer` and return the manifest's record:
    {"url", "served_model", "server_version", "max_model_len", "vocab_size"}.

    Refused (one DadpoError line): no server or not a vLLM one; served_model not served (or several
    served and none named); a server tokenizer that tokenizes sample texts differently; a model
    vocabulary that does not cover the local tokenizer's ids; max_length over max_model_len - 1.
    vocab_size is the number of token ids the server accepts in a prompt."""
    client = _Http(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, where=where)
    try:
        models = client.call("/v1/models")
    except _Refused as exc:
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


def _choose_model(client: _Http, cards: list[dict], served_model: str | None) -> dict:
    names = [card["id"] for card in cards]
    if served_model is not None:
        for card in cards:
            if card["id"] == served_model:
                return card
        raise client.fail(f"the server does not serve {served_model!r}; it serves {', '.join(names) or 'nothing'}")
    if len(cards) != 1:
        raise client.fail(f"the server serves {len(cards)} models ({', '.join(names) or 'none'}); name the one to use")
    return cards[0]


def _check_tokenizer(client: _Http, name: str, tokenizer, tokenizer_name: str) -> None:
    """The server's /tokenize must give the local tokenizer's ids on sample texts (and on the local
    special tokens): same ids, same text, so the same tokenizer as far as dadpo can tell."""
    specials = " ".join(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    texts = [*_SAMPLE_TEXTS, f"{specials} {_SAMPLE_TEXTS[0]} {specials}".strip()]
    for text in texts:
        try:
            answer = client.call("/tokenize", {"model": name, "prompt": text, "add_special_tokens": False})
        except _Refused as exc:
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


def _vocab_size(client: _Http, name: str, local_size: int) -> int:
    """The smallest token id the server refuses in a prompt (vLLM answers 400 "Token id N is out of
    vocabulary"; it accepts ids below max(its tokenizer's, its model's vocabulary)). Found by
    galloping up from the local tokenizer's largest id, then bisecting: a few tiny requests."""

    def accepts(token_id: int) -> bool:
        try:
            client.call("/v1/completions", _completion_request(name, [token_id], False))
        except _Refused as exc:
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
