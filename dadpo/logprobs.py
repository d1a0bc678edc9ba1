"""Sentence log-probs of responses under an HF causal LM: the one computation shared by the hf
scoring backend (dadpo.scoring.hf), verify-cache and the trainer.

    log pi(y|x) = sum_t log_softmax(lm_head(h_{t-1}))[y_t]      over response tokens t

Lean by construction: the decoder runs once over prompt+response, but the lm_head and the fp32
log-softmax run only at response positions, in chunks, so no [batch, seq, vocab] tensor (nor
an fp32 [tokens, vocab] one for the whole batch) ever exists. Under autograd, a batch whose fp32
response logits pass KEEP_LOGITS_BYTES has each chunk recomputed in backward instead of keeping
its logits; a smaller one keeps them (recomputing would run the lm_head twice for little memory).

Two layouts of the same sequences (the sums agree to float rounding):
  padded  collate(...)          [N, L] right-padded rows with an attention mask
  packed  collate(..., packed=True)  one [1, T] row, no padding; position_ids restart at 0 for
          every sequence, which transformers reads as sequence boundaries (flash-attention
          varlen kernels, or a block-diagonal mask for sdpa/eager). check_packing() verifies that
          a given model really keeps packed sequences apart.

Prefix sharing (collate_pairs): a preference pair's prompt runs once. Its row is laid out
[prompt | chosen | rejected]; both responses attend (causally) to the prompt and to themselves,
never to each other, and both take positions P.. after a P-token prompt, so every log-prob is
that of the unshared sequence. The batch carries, per token, its pair (`document`) and branch
(0 prompt, 1 chosen, 2 rejected); forward() turns them into the mask the model's attention
implementation takes (sdpa: bool 4D, eager: additive 4D, flex_attention: a BlockMask), which
transformers passes through untouched. sharing_support() and check_sharing() say whether a
model honours that mask. Padded (a row per pair) and packed (every pair in one row) both work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dadpo.errors import DadpoError
from dadpo.training.config import DEFAULT_CHUNK_TOKENS

# fp32 response logits a training forward may keep for backward (e.g. 1,700 tokens at a 152k
# vocabulary); past it, chunks are recomputed in backward, which costs one more lm_head matmul.
KEEP_LOGITS_BYTES = 2**30


@dataclass
class ResponseBatch:
    """Prompt+response sequences laid out for one decoder call, and where their response tokens sit."""

    input_ids: torch.Tensor  # [N, L] padded, or [1, T] packed
    attention_mask: torch.Tensor | None  # [N, L]; None when packed
    position_ids: torch.Tensor | None  # [1, T] restarting at 0 per sequence when packed; None when padded (unshared)
    row: torch.Tensor  # [R] row of input_ids holding each response token
    position: torch.Tensor  # [R] column whose hidden state predicts that token (t-1)
    target: torch.Tensor  # [R] the response token id
    sequence: torch.Tensor  # [R] index of the sequence the token belongs to
    num_sequences: int
    num_tokens: int  # real (non-pad) tokens fed to the decoder
    # prefix sharing only (collate_pairs): position_ids are then set in both layouts
    document: torch.Tensor | None = None  # [N, L] pair of each token (-1: padding)
    branch: torch.Tensor | None = None  # [N, L] 0 prompt, 1 chosen, 2 rejected

    def to(self, device) -> "ResponseBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return ResponseBatch(**moved)

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def shared(self) -> bool:
        return self.branch is not None


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


Pair = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt_ids, chosen_ids, rejected_ids)


def collate_pairs(pairs: Sequence[Pair], pad_id: int, *, packed: bool = False) -> ResponseBatch:
    """Prefix-shared ResponseBatch of n pairs: one [prompt | chosen | rejected] row per pair
    (padded) or all of them in one row (packed). Its sequences are chosen_0..chosen_{n-1},
    rejected_0..rejected_{n-1}, so ResponseLogprobs(batch)[:n] / [n:] are chosen / rejected."""
    n = len(pairs)
    lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
    shape = (1, sum(lengths)) if packed else (n, max(lengths, default=0))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document = torch.full(shape, -1, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.int8)
    rows, positions, targets, owners = [], [], [], []
    offset = 0
    for i, (prompt_ids, chosen_ids, rejected_ids) in enumerate(pairs):
        if not prompt_ids:
            # the first response token needs a previous position to be predicted from
            raise ValueError(f"pair {i}: empty prompt ids")
        row, start = (0, offset) if packed else (i, 0)
        prompt_len, chosen_len = len(prompt_ids), len(chosen_ids)
        end = start + lengths[i]
        input_ids[row, start:end] = torch.tensor([*prompt_ids, *chosen_ids, *rejected_ids], dtype=torch.long)
        # both responses continue the prompt's positions, as in their own unshared sequences
        position_ids[row, start:end] = torch.cat([torch.arange(prompt_len + chosen_len),
                                                  torch.arange(prompt_len, prompt_len + len(rejected_ids))])
        document[row, start:end] = i
        branch[row, start + prompt_len : start + prompt_len + chosen_len] = 1
        branch[row, start + prompt_len + chosen_len : end] = 2
        last_prompt = start + prompt_len - 1  # predicts the first token of either response
        chosen_start = start + prompt_len
        rejected_start = chosen_start + chosen_len
        for response_ids, first, owner in ((chosen_ids, chosen_start, i), (rejected_ids, rejected_start, n + i)):
            rows.extend([row] * len(response_ids))
            positions.extend([last_prompt, *range(first, first + len(response_ids) - 1)][: len(response_ids)])
            targets.extend(response_ids)
            owners.extend([owner] * len(response_ids))
        offset = end
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    attention_mask = None if packed else (document >= 0).long()
    return ResponseBatch(input_ids, attention_mask, position_ids, as_long(rows), as_long(positions),
                         as_long(targets), as_long(owners), 2 * n, sum(lengths), document, branch)


def pair_sequences(pairs: Sequence[Pair]) -> list[tuple[Sequence[int], Sequence[int]]]:
    """The pairs unshared, in collate_pairs' sequence order: (prompt, chosen)..., (prompt, rejected)..."""
    return [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]


def _sharing_allowed(document: torch.Tensor, branch: torch.Tensor, q, k):
    """Whether query token q may attend to key token k (index tensors that broadcast): same pair,
    causal, and the key is prompt or of the query's own branch. Each token also sees itself, so
    a padding query never has every key masked (a fully masked softmax row is NaN)."""
    same_pair = (document[..., q] == document[..., k]) & (document[..., k] >= 0)
    branch_ok = (branch[..., k] == 0) | (branch[..., k] == branch[..., q])
    return (same_pair & branch_ok & (k <= q)) | (k == q)


def shared_attention_mask(batch: ResponseBatch, attn_implementation: str, dtype: torch.dtype):
    """The 4D mask of a prefix-shared batch, in the form `attn_implementation` takes."""
    document, branch = batch.document, batch.branch
    length = document.shape[1]
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return _sharing_allowed(document[b], branch[b], q, k)

        return create_block_mask(mask_mod, document.shape[0], None, length, length, device=document.device)
    index = torch.arange(length, device=document.device)
    allowed = _sharing_allowed(document, branch, index[:, None], index[None, :])[:, None]  # [N, 1, L, L], True = attend
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":  # eager adds the mask to the scores
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    raise DadpoError(f"prefix sharing: attention implementation {attn_implementation} takes no custom mask; "
                     "run with prefix sharing off")


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

    def __init__(self, model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 keep_logits_bytes: int = KEEP_LOGITS_BYTES):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.keep_logits_bytes = keep_logits_bytes

    def forward(self, batch: ResponseBatch) -> torch.Tensor:
        decoder = self.model.get_decoder()
        lm_head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        # use_cache=False: a KV cache is useless here and would hold every layer's keys/values
        inputs = {"input_ids": batch.input_ids, "use_cache": False}
        if batch.shared:
            dtype = self.model.get_input_embeddings().weight.dtype
            inputs["attention_mask"] = shared_attention_mask(batch, self.model.config._attn_implementation, dtype)
            inputs["position_ids"] = batch.position_ids
        elif batch.packed:
            inputs["position_ids"] = batch.position_ids  # attention_mask stays None: boundaries come from positions
        else:
            inputs["attention_mask"] = batch.attention_mask
        hidden = decoder(**inputs).last_hidden_state
        response_hidden = hidden[batch.row, batch.position]  # [R, H]
        pieces = []
        recompute = torch.is_grad_enabled() and \
            response_hidden.shape[0] * lm_head.weight.shape[0] * 4 > self.keep_logits_bytes
        for start in range(0, response_hidden.shape[0], self.chunk_tokens):
            chunk = response_hidden[start : start + self.chunk_tokens]
            target = batch.target[start : start + self.chunk_tokens]
            if recompute:
                pieces.append(checkpoint(_chunk_logprobs, lm_head, chunk, target, softcap, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(lm_head, chunk, target, softcap))
        token_logprobs = torch.cat(pieces) if pieces else response_hidden.new_zeros(0, dtype=torch.float32)
        sums = torch.zeros(batch.num_sequences, dtype=torch.float64, device=token_logprobs.device)
        return sums.index_add(0, batch.sequence, token_logprobs.double())


def score_pairs(logprobs: nn.Module, pairs: Sequence[Pair], pad_id: int, device, batch_size: int = 8, *,
                shared: bool = True, on_tokens: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 (log pi(chosen | prompt), log pi(rejected | prompt)) per pair, in input order, from a
    ResponseLogprobs (possibly wrapped by accelerate), prefix-shared or not. Longest pairs first,
    batch_size sequences (batch_size // 2 pairs) per batch. Eval mode, no grad; the mode is
    restored. on_tokens gets each batch's prompt+response tokens per sequence (a shared prompt
    counts twice): the count scoring the 2n sequences one by one would report."""
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    chosen, rejected = np.empty(len(pairs), dtype=np.float64), np.empty(len(pairs), dtype=np.float64)
    pairs_per_batch = max(1, batch_size // 2)
    was_training = logprobs.training
    logprobs.eval()  # no dropout
    try:
        with torch.no_grad():
            for start in range(0, len(order), pairs_per_batch):
                indices = order[start : start + pairs_per_batch]
                some = [pairs[i] for i in indices]
                batch = collate_pairs(some, pad_id) if shared else collate(pair_sequences(some), pad_id)
                logps = logprobs(batch.to(device)).double().cpu().numpy()
                chosen[indices], rejected[indices] = logps[: len(some)], logps[len(some) :]
                if on_tokens is not None:
                    on_tokens(sum(2 * len(p) + len(c) + len(r) for p, c, r in some))
    finally:
        logprobs.train(was_training)
    return chosen, rejected


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
