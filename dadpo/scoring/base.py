"""The scorer interface: sentence log-probs of responses given prompts, as token ids.

Every backend receives token ids produced by dadpo.tokenization (backends never tokenize) and
returns, per sequence, the float64 sum over the response tokens of the fp32 log-softmax at the
previous position: log pi(y|x) = sum_t log p(y_t | x, y_<t).
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

import numpy as np

# (prompt_ids, response_ids); the response is scored, the prompt only conditions.
TokenizedSequence = tuple[Sequence[int], Sequence[int]]
# (prompt_ids, chosen_ids, rejected_ids): a pair, whose prompt a backend may compute once.
TokenizedPair = tuple[Sequence[int], Sequence[int], Sequence[int]]


class Scorer(abc.ABC):
    """Scores sequences with one model. Construct, call score()/score_pairs() any number of times, close()."""

    @abc.abstractmethod
    def score(self, sequences: Sequence[TokenizedSequence], on_tokens: Callable[[int], None] | None = None) -> np.ndarray:
        """float64 log pi(response | prompt), one per sequence, in input order. on_tokens, when given,
        is called with the number of tokens scored, for progress bars."""

    def score_pairs(self, pairs: Sequence[TokenizedPair],
                    on_tokens: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(log pi(chosen | prompt), log pi(rejected | prompt)) per pair. Backends that can compute a
        shared prompt once override this; the default scores 2n sequences."""
        n = len(pairs)
        scores = self.score([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], on_tokens)
        return scores[:n], scores[n:]

    def close(self) -> None:
        """Release the model and its device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
