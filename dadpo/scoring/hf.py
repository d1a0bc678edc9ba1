"""The hf scoring backend of cache-teacher: a transformers model scoring sentences with
dadpo.logprobs.ResponseLogprobs (dadpo.scoring.base.Scorer)."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Sequence

import numpy as np
import torch

from dadpo.errors import DadpoError
from dadpo.layout_checks import check_sharing, probe_pairs
from dadpo.logprobs import Pair, ResponseLogprobs, collate, default_device, score_pairs
from dadpo.modeling import load_causal_lm
from dadpo.scoring.base import Scorer


class HFScorer(Scorer):
    """cache-teacher's hf backend (dadpo.scoring.base.Scorer): ResponseLogprobs on a transformers model,
    batched longest first. score_pairs() runs each pair's prompt once where the model computes exactly
    the unshared numbers that way (checked once, on first use: sharing_refused says why not)."""

    def __init__(self, model, dtype: str, options, pad_id: int, trust_remote_code: bool = False):
        self.device = options.device or default_device()
        self.batch_size, self.pad_id, self.name = options.batch_size, pad_id, model.name
        self.logprobs = ResponseLogprobs(load_causal_lm(model, dtype, trust_remote_code)).to(self.device)

    def score(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
              on_tokens: Callable[[int], None] | None = None) -> np.ndarray:
        # Longest first: similar lengths share a batch (little padding), and an out-of-memory error
        # shows up on the first batch rather than hours in.
        order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
        result = np.empty(len(sequences), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                batch = collate([sequences[i] for i in indices], self.pad_id)
                result[indices] = self.logprobs(batch.to(self.device)).cpu().numpy()
                if on_tokens is not None:
                    on_tokens(batch.num_tokens)
        return result

    def score_pairs(self, pairs: Sequence[Pair], on_tokens: Callable[[int], None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(log pi(chosen | prompt), log pi(rejected | prompt)) per pair, in input order: the numbers
        score() gives for the 2n sequences. batch_size counts sequences (batch_size // 2 pairs a batch)."""
        return score_pairs(self.logprobs, pairs, self.pad_id, self.device, self.batch_size,
                           shared=self.sharing_refused is None, on_tokens=on_tokens)

    @functools.cached_property
    def sharing_refused(self) -> str | None:
        """None when score_pairs shares prompts, else the one-line reason it does not."""
        try:
            check_sharing(self.logprobs, probe_pairs(self.logprobs.model.config.vocab_size), self.device, self.name)
        except DadpoError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        self.__dict__.pop("logprobs", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
