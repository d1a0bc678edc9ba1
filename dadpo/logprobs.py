"""Sentence log-probs of responses under an HF causal LM: the one computation shared by the hf
scoring backend, verify-cache and the trainer.

    log pi(y|x) = sum_t log_softmax(lm_head(h_{t-1}))[y_t]      over response tokens t

Lean by construction: the decoder runs once over prompt+response, but the lm_head and the fp32
log-softmax run only at response positions, in chunks, so no [batch, seq, vocab] tensor (nor
an fp32 [tokens, vocab] one for the whole batch) ever exists. Under autograd each chunk is
recomputed in backward instead of keeping its logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Vocab rows per chunk: 4096 tokens x 152k vocab x 4 bytes is 2.5 GB at Qwen2.5 sizes, which
# is the most we are willing to hold at once.
DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class ResponseBatch:
    """Right-padded prompt+response sequences and where their response tokens sit."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    row: torch.Tensor  # [T] sequence index of each response token
    position: torch.Tensor  # [T] position whose hidden state predicts that token (t-1)
    target: torch.Tensor  # [T] the response token id
    num_sequences: int

    def to(self, device) -> "ResponseBatch":
        return ResponseBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.row, self.position, self.target)),
            num_sequences=self.num_sequences,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> ResponseBatch:
    """Build a ResponseBatch from (prompt_ids, response_ids) pairs."""
    lengths = [len(p) + len(r) for p, r in sequences]
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, positions, targets = [], [], []
    for i, (prompt_ids, response_ids) in enumerate(sequences):
        if not prompt_ids:
            # the first response token needs a previous position to be predicted from
            raise ValueError(f"sequence {i}: empty prompt ids")
        ids = list(prompt_ids) + list(response_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        start = len(prompt_ids)
        rows.extend([i] * len(response_ids))
        positions.extend(range(start - 1, len(ids) - 1))
        targets.extend(response_ids)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return ResponseBatch(input_ids, attention_mask, as_long(rows), as_long(positions), as_long(targets), len(sequences))


def _chunk_logprobs(lm_head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, softcap: float | None):
    logits = lm_head(hidden).float()
    if softcap:  # Gemma-2 style final logit soft-capping, as the model's own forward does it
        logits = torch.tanh(logits / softcap) * softcap
    # gather - logsumexp is log_softmax[target] without a second [chunk, vocab] tensor
    return logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class ResponseLogprobs(nn.Module):
    """Wraps a causal LM; forward(batch) -> float64 [N] sums of response-token log-probs.

    Being an nn.Module whose forward runs the model lets DDP/FSDP (accelerate.prepare) wrap it
    directly, so gradient sync hooks see the whole computation.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: ResponseBatch) -> torch.Tensor:
        decoder = self.model.get_decoder()
        lm_head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        response_hidden = hidden[batch.row, batch.position]  # [T, H]
        pieces = []
        for start in range(0, response_hidden.shape[0], self.chunk_tokens):
            chunk = response_hidden[start : start + self.chunk_tokens]
            target = batch.target[start : start + self.chunk_tokens]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(_chunk_logprobs, lm_head, chunk, target, softcap, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(lm_head, chunk, target, softcap))
        token_logprobs = torch.cat(pieces) if pieces else response_hidden.new_zeros(0, dtype=torch.float32)
        sums = torch.zeros(batch.num_sequences, dtype=torch.float64, device=token_logprobs.device)
        return sums.index_add(0, batch.row, token_logprobs.double())
