"""Drawing responses from one model: the hf and vllm samplers behind `dadpo generate`.

A sampler takes prompt token ids (made by dadpo.tokenization.encode_prompt: samplers never
tokenize prompts), samples until the model's end-of-turn token or max_new_tokens, and returns
the response token ids without that token, plus why it ended ("stop" or "length").

    hf    batched model.generate: prompts left-padded, similar lengths batched together; the
          torch RNG is seeded per call from (seed, stream, chunk)
    vllm  vllm.LLM.generate on TokensPrompt; every prompt gets its own seed from (seed, stream, id),
          so results do not depend on batching. Needs an `if __name__ == "__main__":` guard.

sample_responses() is the one-call version (e.g. greedy evaluation of a trained student).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

from dadpo.errors import DadpoError
from dadpo.modeling import ResolvedModel, load_tokenizer, max_positions, resolve_model, resolved_dtype
from dadpo.scoring.base import EngineOptions
from dadpo.tokenization import encode_prompt, uses_chat_template


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn; temperature 0 is greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def derived_seed(*parts) -> int:
    """A 31-bit seed from the run seed and where we are, stable across runs and machines."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def stop_token_ids(tokenizer, chat: bool, generation_config=None) -> list[int]:
    """Where a response ends: the eos token(s) and, in chat mode, the token the chat template puts
    right after an assistant message (e.g. <|im_end|>, <|eot_id|>), when it is a special token."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    if chat:
        marker = "\u2063dadpo-end\u2063"  # text no template would produce on its own
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if marker in rendered:
            after = tokenizer(rendered.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            if after and after[0] in set(tokenizer.all_special_ids):
                ids.add(after[0])
    if not ids:
        raise DadpoError("the tokenizer has no eos token and its chat template no end-of-turn token, "
                         "so a response would never end")
    return sorted(ids)


def _trim(ids: list[int], stops: set[int]) -> tuple[list[int], str]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i], "stop"
    return ids, "length"


def make_sampler(backend: str, model: ResolvedModel, tokenizer, chat: bool, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False):
    """An HFSampler or VLLMSampler; `stream` (e.g. "teacher") keeps two models' random draws apart."""
    cls = VLLMSampler if backend == "vllm" else HFSampler
    return cls(model, tokenizer, chat, sampling, stream, dtype, engine, trust_remote_code)


class HFSampler:
    def __init__(self, model: ResolvedModel, tokenizer, chat: bool, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False):
        import torch

        from dadpo.modeling import load_causal_lm
        from dadpo.scoring.hf import default_device

        self.torch, self.sampling, self.stream, self.batch_size = torch, sampling, stream, engine.batch_size
        self.device = engine.device or default_device()
        self.model = load_causal_lm(model, dtype, trust_remote_code).to(self.device)
        self.stops = stop_token_ids(tokenizer, chat, getattr(self.model, "generation_config", None))
        self.pad_id = self.stops[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
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
                results[i] = _trim(out[row, width:].tolist(), set(self.stops))
        return results

    def close(self) -> None:
        import gc

        self.__dict__.pop("model", None)
        gc.collect()


class VLLMSampler:
    def __init__(self, model: ResolvedModel, tokenizer, chat: bool, sampling: Sampling, stream: str,
                 dtype: str = "auto", engine: EngineOptions = EngineOptions(), trust_remote_code: bool = False):
        import logging

        # As in dadpo.scoring.vllm: before vllm is imported, quiet logs and a small CPU KV cache.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import GenerationConfig
        from vllm import LLM, SamplingParams

        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
        self.SamplingParams, self.sampling, self.stream = SamplingParams, sampling, stream
        args = dict(model=model.local_path, revision=model.revision, dtype=resolved_dtype(model, dtype),
                    trust_remote_code=trust_remote_code, tensor_parallel_size=engine.tensor_parallel_size,
                    seed=sampling.seed, skip_tokenizer_init=True)  # we pass ids and decode ourselves
        for key in ("gpu_memory_utilization", "max_model_len", "max_num_batched_tokens"):
            if getattr(engine, key) is not None:
                args[key] = getattr(engine, key)
        args.update(engine.extra)
        self.llm = LLM(**args)
        self.limit = int(self.llm.llm_engine.model_config.max_model_len)
        try:
            generation_config = GenerationConfig.from_pretrained(model.local_path)
        except Exception:  # no generation_config.json: the tokenizer's eos is enough
            generation_config = None
        self.stops = stop_token_ids(tokenizer, chat, generation_config)

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
        return [_trim(list(o.outputs[0].token_ids), set(self.stops)) for o in outputs]

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: `dadpo generate` runs each vllm pass in its own process anyway
            pass


def sample_responses(model: str, prompts: Sequence[list[dict]], sampling: Sampling = Sampling(temperature=0.0),
                     backend: str = "hf", dtype: str = "auto", engine: EngineOptions = EngineOptions(),
                     no_chat_template: bool = False, trust_remote_code: bool = False) -> list[str]:
    """One response per prompt (a list of {role, content} messages) from `model`, decoded without
    special tokens; greedy by default. For evaluation; `dadpo generate` is the resumable pipeline."""
    resolved = resolve_model(model)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    chat = uses_chat_template(tokenizer, no_chat_template)
    prompt_ids = [encode_prompt(tokenizer, messages, chat, f"prompt {i}") for i, messages in enumerate(prompts)]
    sampler = make_sampler(backend, resolved, tokenizer, chat, sampling, "sample", dtype, engine, trust_remote_code)
    try:
        for i, ids in enumerate(prompt_ids):
            sampler.check_length(len(ids), f"prompt {i}")
        outputs = sampler.generate(prompt_ids, [str(i) for i in range(len(prompt_ids))])
    finally:
        sampler.close()
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
