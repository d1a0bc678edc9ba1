"""Drawing responses from one model: the hf and vllm samplers behind `dadpo generate`.

A sampler takes prompt token ids (made by dadpo.tokenization: samplers never tokenize), samples
until one of the model's stop tokens (ModelTokenizer.stop_ids) or max_new_tokens, and returns the
sampled ids, the stop token included, and why it ended ("stop" or "length"). Those ids are exactly
what cache-teacher later scores for this model (tokenization rule v2).

    hf    batched model.generate: prompts left-padded, similar lengths batched together; the torch
          RNG is seeded per call from (seed, stream, chunk)
    vllm  vllm.LLM.generate on TokensPrompt (dadpo.engine); every prompt gets its own seed from
          (seed, stream, id), so results do not depend on batching. Needs an `if __name__ == "__main__":` guard.
    served a running vLLM server's /v1/completions on the prompt's ids (the served-model client,
          dadpo.scoring.client), the vllm sampler's seeds; for a model too large for this node.

sample_responses() is the one-call version (e.g. greedy evaluation of a trained student).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from dadpo.engine import EngineOptions, build_llm, checkpoint_dtype, env_defaults, shutdown_llm
from dadpo.errors import DadpoError
from dadpo.modeling import ResolvedModel, max_positions, model_tokenizer, resolve_model
from dadpo.config import Sampling
from dadpo.scoring.client import Http, Refused, run_concurrently
from dadpo.tokenization import ModelTokenizer, today


def derived_seed(*parts) -> int:
    """A 31-bit seed from the run seed and where we are, stable across runs and machines."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def finish(ids: list[int], stops: set[int]) -> tuple[list[int], str]:
    """Sampled ids up to and including the first stop token ("stop"), or all of them ("length")."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1], "stop"
    return ids, "length"


def make_sampler(backend: str, model: ResolvedModel, tokenizer: ModelTokenizer, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False,
                 server: dict | None = None):
    """An HFSampler, VLLMSampler or (server: served_model_settings' dict) ServedSampler; `stream`
    (e.g. "teacher") keeps two models' random draws apart."""
    if server is not None:
        return ServedSampler(server, tokenizer, sampling, stream)
    cls = VLLMSampler if backend == "vllm" else HFSampler
    return cls(model, tokenizer, sampling, stream, dtype, engine, trust_remote_code)


class HFSampler:
    def __init__(self, model: ResolvedModel, tokenizer: ModelTokenizer, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False):
        import torch

        from dadpo.modeling import load_causal_lm
        from dadpo.logprobs import default_device

        self.torch, self.sampling, self.stream, self.batch_size = torch, sampling, stream, engine.batch_size
        self.device = engine.device or default_device()
        self.model = load_causal_lm(model, dtype, trust_remote_code).to(self.device)
        self.stops = list(tokenizer.stop_ids)
        self.pad_id = self.stops[0] if tokenizer.tokenizer.pad_token_id is None else tokenizer.tokenizer.pad_token_id
        self.limit = max_positions(model)

    def check_length(self, n: int, where: str) -> None:
        if self.limit and n >= self.limit:
            raise DadpoError(f"{where}: the prompt is {n} tokens, the model's limit is {self.limit}")

    def generate(self, prompt_ids: Sequence[Sequence[int]], ids: Sequence[str], chunk: int = 0) -> list[tuple[list[int], str]]:
        from transformers import GenerationConfig

        torch, s = self.torch, self.sampling
        torch.manual_seed(derived_seed(s.seed, self.stream, chunk))
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        results: list = [None] * len(prompt_ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(prompt_ids[i]):] = torch.tensor(list(prompt_ids[i]))
                attention_mask[row, width - len(prompt_ids[i]):] = 1
            new_tokens = s.max_new_tokens if not self.limit else min(s.max_new_tokens, self.limit - width)
            # Every knob explicit: the model's own generation_config (top_k, repetition penalty...)
            # would otherwise change the distribution behind the recorded settings.
            knobs = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature else \
                dict(do_sample=False)
            config = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.0, eos_token_id=self.stops,
                                      pad_token_id=self.pad_id, **knobs)
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device), generation_config=config)
            for row, i in enumerate(batch):
                results[i] = finish(out[row, width:].tolist(), set(self.stops))
        return results

    def close(self) -> None:
        import gc

        self.__dict__.pop("model", None)
        gc.collect()


class VLLMSampler:
    def __init__(self, model: ResolvedModel, tokenizer: ModelTokenizer, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False):
        env_defaults()  # before vllm's first import in this process
        from vllm import SamplingParams

        self.SamplingParams, self.sampling, self.stream = SamplingParams, sampling, stream
        self.llm = build_llm(model.local_path, model.revision, checkpoint_dtype(model.local_path, dtype), engine,
                             trust_remote_code, seed=sampling.seed)
        self.limit = int(self.llm.llm_engine.model_config.max_model_len)
        self.stops = list(tokenizer.stop_ids)

    def check_length(self, n: int, where: str) -> None:
        if n >= self.limit:
            raise DadpoError(f"{where}: the prompt is {n} tokens, the engine's max_model_len is {self.limit}")

    def generate(self, prompt_ids: Sequence[Sequence[int]], ids: Sequence[str], chunk: int = 0) -> list[tuple[list[int], str]]:
        from vllm.inputs import TokensPrompt

        s = self.sampling
        params = [self.SamplingParams(
            max_tokens=min(s.max_new_tokens, self.limit - len(p)), temperature=s.temperature, top_p=s.top_p,
            seed=derived_seed(s.seed, self.stream, row_id), stop_token_ids=self.stops, detokenize=False)
            for p, row_id in zip(prompt_ids, ids)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        return [finish(list(o.outputs[0].token_ids), set(self.stops)) for o in outputs]

    def close(self) -> None:
        shutdown_llm(self.__dict__.pop("llm", None))


def served_model_settings(url: str, tokenizer: ModelTokenizer, flag: str, *, api_key: str | None,
                          key_source: str | None, concurrency: int, timeout_s: float, retries: int) -> dict:
    """Probe the server at url for the model `tokenizer` belongs to (dadpo.scoring.server.probe_server:
    a vLLM server whose tokenizer and vocabulary agree) and return what ServedSampler needs; its
    "record" (url without credentials, served model, vLLM version, max_model_len) is for the output's
    settings. flag: the model's flag (--teacher), whose -url and -api-key-env flags messages name."""
    from dadpo.scoring.server import probe_server

    key_source = key_source or f"{flag}-api-key-env VAR"  # without a key: the flag that would give one
    record = probe_server(url, tokenizer=tokenizer.tokenizer, max_length=None, where=f"{flag}-url",
                          tokenizer_name=f"{flag}'s tokenizer", timeout_s=timeout_s, retries=retries, api_key=api_key,
                          key_source=key_source)
    # "url" as given: a user:password@ in it is the server's credentials (sent as basic auth, never recorded)
    return {"record": record, "url": url, "api_key": api_key, "key_source": key_source, "concurrency": concurrency,
            "timeout_s": timeout_s, "retries": retries, "where": f"{flag}-url"}


class ServedSampler:
    """Samples through a running vLLM OpenAI-compatible server (served_model_settings probes it first).

    One request per prompt, POST /v1/completions with the prompt's token ids, the same per-prompt
    seed as VLLMSampler, and every sampling knob given: a server fills what a request leaves out
    from the model's generation_config.json (top_k, repetition_penalty...), which would change the
    distribution behind the recorded settings. The answer's choices[0].token_ids (return_token_ids)
    are the sampled ids; the server never tokenizes or detokenizes what is kept. A response the
    server cut short of the tokens asked (its generation config's max_new_tokens is a hard cap) is
    refused, never kept as if the model had been given room."""

    def __init__(self, server: dict, tokenizer: ModelTokenizer, sampling: Sampling, stream: str):
        record = server["record"]
        self.http = Http(server["url"], timeout_s=server["timeout_s"], retries=server["retries"], backoff_s=1.0,
                         where=server["where"], api_key=server["api_key"], key_source=server["key_source"])
        self.served_model, self.limit = record["served_model"], int(record["max_model_len"])
        self.concurrency, self.sampling, self.stream = server["concurrency"], sampling, stream
        self.stops = list(tokenizer.stop_ids)

    def check_length(self, n: int, where: str) -> None:
        if n >= self.limit:
            raise DadpoError(f"{where}: the prompt is {n} tokens, the server's max_model_len is {self.limit}")

    def generate(self, prompt_ids: Sequence[Sequence[int]], ids: Sequence[str], chunk: int = 0) -> list[tuple[list[int], str]]:
        results: list = [None] * len(prompt_ids)

        def received(done: list) -> None:
            for i, result in done:
                results[i] = result

        run_concurrently(list(zip(prompt_ids, ids)), lambda item, halt: self._sample_one(*item, halt), received,
                         concurrency=self.concurrency, name="dadpo-sample")
        return results

    def _sample_one(self, prompt: Sequence[int], row_id: str, halt) -> tuple[list[int], str]:
        s = self.sampling
        max_tokens = min(s.max_new_tokens, self.limit - len(prompt))
        payload = {"model": self.served_model, "prompt": [int(t) for t in prompt], "n": 1,
                   "max_tokens": max_tokens, "temperature": s.temperature,
                   "top_p": s.top_p, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "seed": derived_seed(s.seed, self.stream, row_id),
                   "stop_token_ids": self.stops, "return_token_ids": True}
        try:
            answer = self.http.call("/v1/completions", payload, halt)
        except Refused as exc:
            raise self.http.fail(f"the server refused prompt '{row_id}' ({exc})") from None
        try:
            sampled = answer["choices"][0]["token_ids"]
        except (KeyError, IndexError, TypeError):
            sampled = None
        if not isinstance(sampled, list) or not all(isinstance(t, int) for t in sampled):
            raise self.http.fail(f"prompt '{row_id}': the answer has no choices[0].token_ids; dadpo needs a vLLM "
                                 "server that returns sampled ids (return_token_ids, vLLM 0.10.2 or newer)")
        ids, reason = finish(sampled, set(self.stops))  # vLLM's token_ids end with the stop token that ended them
        if reason == "length" and len(ids) < max_tokens:
            # a max_new_tokens in the server's generation config caps every request, whatever it asks
            raise self.http.fail(f"prompt '{row_id}': the server cut the response at {len(ids)} new tokens, fewer "
                                 f"than the {max_tokens} asked (a server started with a generation config whose "
                                 "max_new_tokens caps every request?); lower --max-new-tokens or restart the "
                                 "server without that cap")
        return ids, reason

    def close(self) -> None:
        pass


def sample_responses(model: str, prompts: Sequence[list[dict] | str], sampling: Sampling = Sampling(temperature=0.0),
                     backend: str = "hf", dtype: str = "auto", engine: EngineOptions = EngineOptions(),
                     no_chat_template: bool = False, trust_remote_code: bool = False,
                     template_kwargs: dict | None = None) -> list[str]:
    """One response per prompt (a list of {role, content} messages, or raw text) from `model`, decoded
    without special tokens; greedy by default. For evaluation; `dadpo generate` is the resumable pipeline."""
    resolved = resolve_model(model)
    tokenizer = model_tokenizer(resolved, "--model", no_chat_template=no_chat_template, template_kwargs=template_kwargs,
                                template_date=today(), trust_remote_code=trust_remote_code)
    outputs = sample_token_ids(resolved, tokenizer, prompts, [str(i) for i in range(len(prompts))], sampling,
                               backend, dtype, engine, trust_remote_code)
    return [decode_response(tokenizer, ids) for ids, _ in outputs]


def decode_response(tokenizer: ModelTokenizer, ids: Sequence[int]) -> str:
    """A sampled response's text: its ids less the stop tokens, without special tokens."""
    stops = set(tokenizer.stop_ids)
    return tokenizer.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)


def sample_token_ids(model: ResolvedModel, tokenizer: ModelTokenizer, prompts: Sequence[list[dict] | str],
                     ids: Sequence[str], sampling: Sampling, backend: str = "hf", dtype: str = "auto",
                     engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False,
                     stream: str = "sample", where: str = "prompt") -> list[tuple[list[int], str]]:
    """(sampled ids, finish reason) per prompt, each prompt rendered by `tokenizer`; the sampler is
    built for this call and closed after it. Prompt i is named `{where} '{ids[i]}'` in errors."""
    prompt_ids = [tokenizer.encode_prompt(prompt, f"{where} '{row_id}'") for prompt, row_id in zip(prompts, ids)]
    sampler = make_sampler(backend, model, tokenizer, sampling, stream, dtype, engine, trust_remote_code)
    try:
        for row_id, p in zip(ids, prompt_ids):
            sampler.check_length(len(p), f"{where} '{row_id}'")
        return sampler.generate(prompt_ids, list(ids))
    finally:
        sampler.close()
