"""The scorer interface: sentence log-probs of responses given prompts, as token ids.

Every backend receives token ids produced by dadpo.tokenization (backends never tokenize),
and returns, per sequence, the float64 sum over the response tokens of the fp32 log-softmax
at the previous position: log pi(y|x) = sum_t log p(y_t | x, y_<t).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# (prompt_ids, response_ids); the response is scored, the prompt only conditions.
TokenizedSequence = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class ModelSpec:
    """What to load: an HF hub id or a local folder, and how."""

    path: str
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EngineOptions:
    """Backend knobs. hf uses batch_size/device; vllm uses the rest (and ignores batch_size)."""

    batch_size: int = 8
    device: str | None = None  # hf: None picks cuda when available, else cpu
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    fp32_head: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)  # --vllm-arg KEY=VALUE, already parsed


class Scorer(abc.ABC):
    """Scores sequences with one model. Construct, call score() any number of times, close()."""

    #: backend name recorded in the manifest ("hf" or "vllm")
    backend: str

    @abc.abstractmethod
    def score(self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None) -> np.ndarray:
        """Return float64 log pi(response | prompt), one per sequence, in input order.

        on_tokens, when given, is called with the number of tokens (prompt + response) as
        they are scored, for progress bars."""

    @abc.abstractmethod
    def backend_version(self) -> str:
        """Version string of the engine (e.g. transformers or vllm version)."""

    def close(self) -> None:
        """Release the model and its device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
