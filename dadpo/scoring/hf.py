"""The hf scoring backend: a transformers forward pass, batched and length-sorted."""

from __future__ import annotations

import gc
from typing import Callable, Sequence

import numpy as np
import torch

from dadpo.engine import EngineOptions
from dadpo.logprobs import ResponseLogprobs, collate
from dadpo.modeling import ResolvedModel, load_causal_lm
from dadpo.scoring.base import Scorer, TokenizedSequence


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFScorer(Scorer):
    def __init__(self, model: ResolvedModel, dtype: str, options: EngineOptions, pad_id: int,
                 trust_remote_code: bool = False):
        self.device = options.device or default_device()
        self.batch_size = options.batch_size
        self.pad_id = pad_id
        lm = load_causal_lm(model, dtype, trust_remote_code)
        self.logprobs = ResponseLogprobs(lm).to(self.device)

    def score(self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None) -> np.ndarray:
        # Longest first: similar lengths share a batch (little padding), and an out-of-memory
        # error shows up on the first batch rather than hours in.
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

    def backend_version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}, torch {torch.__version__}"

    def close(self) -> None:
        del self.logprobs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
