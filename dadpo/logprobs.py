"""Sentence log-probs of responses under an HF causal LM: the one computation shared by the hf
scoring backend, verify-cache and the trainer.

    log pi(y|x) = sum_t log_softmax(lm_head(h_{t-1}))[y_t]      over response tokens t

Lean by construction: the decoder runs once over prompt+response, but the lm_head and the fp32
log-softmax run only at response positions, in chunks, so no [batch, seq, vocab] tensor (nor
an fp32 [tokens, vocab] one for the whole batch) ever exists. Under autograd each chunk is
recomputed in backward instead of keeping its logits.

Two layouts of the same sequences (the sums agree to float rounding):
  padded  collate(...)          [N, L] right-padded rows with an attention mask
  packed  collate(..., packed=True)  one [1, T] row, no padding; position_ids restart at 0 for
          every sequence, which transformers reads as sequence boundaries (flash-attention
          varlen kernels, or a block-diagonal mask for sdpa/eager). check_packing() verifies that
          a given model really keeps packed sequences apart.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dadpo.errors import DadpoError

# Vocab rows per chunk: 4096 tokens x 152k vocab x 4 bytes is 2.5 GB at Qwen2.5 sizes, which
# is the most we are willing to hold at once.
DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class ResponseBatch:
    """Prompt+response sequences laid out for one decoder call, and where their response tokens sit."""

    input_ids: torch.Tensor  # [N, L] padded, or [1, T] packed
    attention_mask: torch.Tensor | None  # [N, L]; None when packed
    position_ids: torch.Tensor | None  # [1, T] restarting at 0 per sequence when packed; None when padded
    row: torch.Tensor  # [R] row of input_ids holding each response token
    position: torch.Tensor  # [R] column whose hidden state predicts that token (t-1)
    target: torch.Tensor  # [R] the response token id
    sequence: torch.Tensor  # [R] index of the sequence the token belongs to
    num_sequences: int
    num_tokens: int  # real (non-pad) tokens fed to the decoder

    def to(self, device) -> "ResponseBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return ResponseBatch(**moved)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None


def collate(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, packed: bool = False) -> ResponseBatch:
    """Build a ResponseBatch from (prompt_ids, response_ids) pairs, padded or packed."""
    lengths = [len(p) + len(r) for p, r in sequences]
    rows, positions, targets, owners = [], [], [], []
    if packed:
        input_ids = torch.empty((1, sum(lengths)), dtype=torch.long)
        position_ids = torch.empty((1, sum(lengths)), dtype=torch.long)
        attention_mask = None
    else:
        input_ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), max(lengths)), dtype=torch.long)
        position_ids = None
    offset = 0
    for i, (prompt_ids, response_ids) in enumerate(sequences):
        if not prompt_ids:
            # the first response token needs a previous position to be predicted from
            raise ValueError(f"sequence {i}: empty prompt ids")
        ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long)
        row, start = (0, offset) if packed else (i, 0)
        input_ids[row, start : start + len(ids)] = ids
        if packed:
            position_ids[0, start : start + len(ids)] = torch.arange(len(ids))
        else:
            attention_mask[i, : len(ids)] = 1
        first = start + len(prompt_ids)
        rows.extend([row] * len(response_ids))
        positions.extend(range(first - 1, start + len(ids) - 1))
        targets.extend(response_ids)
        owners.extend([i] * len(response_ids))
        offset += len(ids)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return ResponseBatch(input_ids, attention_mask, position_ids, as_long(rows), as_long(positions),
                         as_long(targets), as_long(owners), len(sequences), sum(lengths))


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
        # use_cache=False: a KV cache is useless here and would hold every layer's keys/values
        inputs = {"input_ids": batch.input_ids, "use_cache": False}
        if batch.packed:
            inputs["position_ids"] = batch.position_ids  # attention_mask stays None: boundaries come from positions
        else:
            inputs["attention_mask"] = batch.attention_mask
        hidden = decoder(**inputs).last_hidden_state
        response_hidden = hidden[batch.row, batch.position]  # [R, H]
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
        return sums.index_add(0, batch.sequence, token_logprobs.double())


def check_packing(logprobs: nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                  device, where: str, unwrapped: ResponseLogprobs | None = None) -> float:
    """Refuse (DadpoError) unless packed log-probs of `sequences` equal the padded ones.

    A model whose attention ignores position_ids boundaries (a custom mask, remote code, an old
    attention implementation) lets packed sequences see each other; that shows up here as a
    difference far above float rounding. Returns the largest difference per response token.
    `logprobs` may be wrapped (DDP, FSDP); then `unwrapped` is the ResponseLogprobs inside.
    """
    unwrapped = unwrapped or logprobs
    decoder = unwrapped.model.get_decoder()
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise DadpoError(f"--packing: {where} does not take position_ids, so packed sequences cannot be "
                         "separated; run without --packing")
    was_training = logprobs.training
    logprobs.eval()
    with torch.no_grad():
        padded = logprobs(collate(sequences, 0).to(device))
        packed = logprobs(collate(sequences, 0, packed=True).to(device))
    logprobs.train(was_training)
    per_token = ((packed - padded).abs() / torch.tensor([len(r) for _, r in sequences], device=padded.device)).max()
    dtype = next(unwrapped.model.parameters()).dtype
    # nats per token. Layout noise is ~1e-7 in fp32 and ~1e-4 in bf16; a model that mixes packed
    # sequences is off by ~1e-2 even at random init.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-3
    if not torch.isfinite(per_token) or float(per_token) > tolerance:
        raise DadpoError(f"--packing: {where} lets packed sequences attend to each other (packed and padded "
                         f"log-probs differ by {float(per_token):.3g} nats per token); its attention ignores "
                         "position_ids boundaries, run without --packing")
    return float(per_token)
