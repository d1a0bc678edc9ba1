"""The judges of `dadpo eval`: each turns pending requests into judgment rows (dadpo.eval.store).

    ServedJudge   an OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, a hosted API) through
                  the served-model client (dadpo.scoring.client.Http: timeouts, retries with backoff);
                  requests from a bounded pool of daemon threads, results handed to the caller's thread
    LocalJudge    a causal LM run in-process through dadpo's sampling path (vLLM, else HF), the judge
                  prompt rendered by the judge's own chat template, greedy
    RewardJudge   a sequence-classification reward model: one reward per (prompt, response)

An LM judge's reply without a verdict is asked again (temperature 0.7, a seed per attempt) up to
`retries` times; then the row keeps its last reply and no verdict: a parse failure, never a loss.
Rows reach the caller through `on_rows` in the caller's thread, as soon as they complete, so the
caller can write them before the next ones arrive; a stop signal ends the run after the rows in hand.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable

from dadpo import stop
from dadpo.errors import DadpoError
from dadpo.eval.verdicts import parse_verdict
from dadpo.scoring.client import Http, Refused, key_from_env, redact_url, run_concurrently

RETRY_TEMPERATURE = 0.7
_BACKOFF_S = 1.0


@dataclass(frozen=True)
class JudgeRequest:
    key: tuple[str, str, str]  # (prompt id, model, order)
    prompt: str  # the rendered judge prompt (one user turn)


def row(key: tuple[str, str, str], reply: str | None, verdict: str | None, attempts: int,
        score: float | None = None) -> dict:
    return {"id": key[0], "model": key[1], "order": key[2], "reply": reply, "verdict": verdict,
            "attempts": attempts, "score": score}


def api_key_from_env(variable: str | None) -> tuple[str | None, str | None]:
    """(the key in $variable, "$variable") for --judge-api-key-env; (None, None) without the flag. The
    served client's rule (dadpo.scoring.client.key_from_env): an unset or empty variable is one line."""
    if variable is None:
        return None, None
    return key_from_env(variable, "--judge-api-key-env")


def public_url(url: str) -> str:
    """The URL as summaries and messages show it: no user:password@ (the served client's redact_url)
    and no query string (a key may ride in it)."""
    return redact_url(url).partition("?")[0].partition("#")[0]


class ServedJudge:
    kind = "served"

    def __init__(self, url: str, model: str, *, api_key: str | None, key_source: str | None, retries: int,
                 concurrency: int, timeout_s: float, max_new_tokens: int, seed: int = 0,
                 backoff_s: float = _BACKOFF_S):
        if concurrency < 1:
            raise DadpoError(f"--judge-concurrency {concurrency}: must be at least 1")
        self.http = Http(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, where="--judge-url",
                          api_key=api_key, key_source=key_source)
        # the probe tries twice, quickly: an unreachable judge is found before any response is generated
        self._probe_http = Http(url, timeout_s=min(timeout_s, 30.0), retries=1, backoff_s=backoff_s,
                                 where="--judge-url", api_key=api_key, key_source=key_source)
        self.model, self.retries, self.concurrency = model, retries, concurrency
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def record(self) -> dict:
        return {"kind": self.kind, "model": self.model, "url": public_url(self.http.url),
                "max_new_tokens": self.max_new_tokens, "weights_digest": None}

    def probe(self) -> None:
        """Fail early, before any response is generated, when the server cannot be reached or refuses the key."""
        try:
            self._probe_http.call("/v1/models")
        except Refused:
            pass  # a server without /v1/models (some proxies): the judging requests will tell (401/403 raise above)

    def run(self, requests: list[JudgeRequest], on_rows: Callable[[list[dict]], None]) -> None:
        if not requests:
            return
        # a stop signal ends the run after the rows in hand
        run_concurrently(requests, self._judge_one, lambda done: on_rows([row for _, row in done]),
                         concurrency=self.concurrency, name="dadpo-judge", poll=stop.raise_if_requested)

    def _judge_one(self, request: JudgeRequest, halt: threading.Event) -> dict:
        reply = None
        for attempt in range(1, self.retries + 2):
            payload = {"model": self.model, "messages": [{"role": "user", "content": request.prompt}],
                       "max_tokens": self.max_new_tokens, "temperature": 0.0 if attempt == 1 else RETRY_TEMPERATURE}
            if attempt > 1:
                payload["seed"] = _seed(self.seed, request.key, attempt)
            try:
                answer = self.http.call("/v1/chat/completions", payload, halt)
            except Refused as exc:
                raise self.http.fail(f"refused the judge request for id {request.key[0]!r} ({exc})") from None
            except DadpoError as exc:
                if halt.is_set():  # another request already failed, or a stop: not this one's fault
                    raise _Halted() from None
                raise DadpoError(f"{exc}; finished judgments are kept: re-run the same command to continue") from None
            reply = _reply_text(answer, self.http)
            verdict = parse_verdict(reply)
            if verdict is not None:
                return row(request.key, reply, verdict, attempt)
        return row(request.key, reply, None, self.retries + 1)


class _Halted(Exception):
    """A worker gave up because the run is ending anyway."""


def _reply_text(answer, http) -> str:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise http.fail("the answer has no choices[0].message.content; is this an OpenAI-compatible "
                        "/v1/chat/completions server?") from None
    return content if isinstance(content, str) else ""


def _seed(seed: int, key: tuple, attempt: int) -> int:
    from dadpo.sampling import derived_seed

    return derived_seed(seed, "judge", *key, attempt)


class LocalJudge:
    """A causal LM judging in this process through dadpo's sampler (vLLM when the backend is vllm)."""

    kind = "local"
    chunk = 64  # requests per generate call: the unit kept across a crash or a stop

    def __init__(self, path: str, *, retries: int, max_new_tokens: int, backend: str, dtype: str, engine,
                 seed: int = 0, trust_remote_code: bool = False, date: str | None = None):
        from dadpo.modeling import model_tokenizer, resolve_model, weights_digest

        self.model = resolve_model(path, None, "--judge")
        self.tokenizer = model_tokenizer(self.model, "--judge", template_date=date,
                                         trust_remote_code=trust_remote_code)
        self.digest = weights_digest(self.model)
        self.retries, self.max_new_tokens, self.backend = retries, max_new_tokens, backend
        self.dtype, self.engine, self.seed, self.trust_remote_code = dtype, engine, seed, trust_remote_code

    def record(self) -> dict:
        return {"kind": self.kind, "model": self.model.record_name, "url": None,
                "max_new_tokens": self.max_new_tokens, "weights_digest": self.digest}

    def probe(self) -> None:
        pass

    def run(self, requests: list[JudgeRequest], on_rows: Callable[[list[dict]], None]) -> None:
        if not requests:
            return
        from dadpo.config import Sampling
        from dadpo.sampling import decode_response, make_sampler

        greedy = Sampling(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=self.seed)
        sampler = make_sampler(self.backend, self.model, self.tokenizer, greedy, "judge", self.dtype, self.engine,
                               self.trust_remote_code)
        try:
            for start in range(0, len(requests), self.chunk):
                chunk = requests[start : start + self.chunk]
                ids = ["|".join(r.key) for r in chunk]
                prompt_ids = []
                for request, row_id in zip(chunk, ids):
                    where = f"--judge prompt for id {request.key[0]!r} ({request.key[1]}, {request.key[2]})"
                    prompt_ids.append(self.tokenizer.encode_prompt([{"role": "user", "content": request.prompt}],
                                                                   where))
                    sampler.check_length(len(prompt_ids[-1]), where)
                results: dict[int, dict] = {}
                pending = list(range(len(chunk)))
                for attempt in range(1, self.retries + 2):
                    sampler.sampling = greedy if attempt == 1 else \
                        replace(greedy, temperature=RETRY_TEMPERATURE, seed=self.seed + attempt)
                    outputs = sampler.generate([prompt_ids[i] for i in pending], [ids[i] for i in pending], attempt)
                    still = []
                    for i, (token_ids, _) in zip(pending, outputs):
                        reply = decode_response(self.tokenizer, token_ids)
                        verdict = parse_verdict(reply)
                        results[i] = row(chunk[i].key, reply, verdict, attempt)
                        if verdict is None:
                            still.append(i)
                    pending = still
                    if not pending:
                        break
                on_rows([results[i] for i in range(len(chunk))])
                stop.raise_if_requested()
        finally:
            sampler.close()


class RewardJudge:
    """Rewards of each (prompt, response) from a sequence-classification model (dadpo.eval.reward)."""

    kind = "reward"
    chunk = 64

    def __init__(self, path: str, *, device: str | None, dtype: str, date: str | None):
        from dadpo.eval.reward import RewardModel
        from dadpo.modeling import resolve_model, weights_digest

        self.path = path
        self.digest = weights_digest(resolve_model(path, None, "--judge"))
        self.reward_model = RewardModel(path, device=device or _default_device(), dtype=dtype, date=date)

    def record(self) -> dict:
        return {"kind": self.kind, "model": self.path, "url": None, "max_new_tokens": None,
                "weights_digest": self.digest}

    def probe(self) -> None:
        pass

    def run(self, items: list[tuple[tuple[str, str, str], object, str]], on_rows) -> None:
        """items: (key, prompt, response) -> rows whose score is the reward."""
        try:
            for start in range(0, len(items), self.chunk):
                chunk = items[start : start + self.chunk]
                rewards = self.reward_model.rewards([p for _, p, _ in chunk], [r for _, _, r in chunk])
                on_rows([row(key, None, None, 1, float(value)) for (key, _, _), value in zip(chunk, rewards)])
                stop.raise_if_requested()
        finally:
            self.reward_model.close()


def _default_device() -> str:
    from dadpo.logprobs import default_device

    return str(default_device())
