"""Start-up checks of a model's attention, before a run relies on a batch layout: that packed
sequences (--packing) and a pair's shared prompt (prefix sharing) give exactly the numbers of the
plain padded layout. A model whose attention ignores position-id boundaries or a custom 4D mask,
or masks in its own way (sliding windows), is refused with one line, or (prefix sharing by
default) run unshared.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
from torch import nn

from dadpo.errors import DadpoError, first_line
from dadpo.logprobs import Pair, ResponseBatch, ResponseLogprobs, collate, collate_pairs, pair_sequences


def _layout_difference(logprobs: nn.Module, unwrapped: ResponseLogprobs, reference: ResponseBatch,
                       other: ResponseBatch, device, failure: str,
                       compute_dtype: torch.dtype | None) -> tuple[float, float]:
    """Largest |difference| per response token between two layouts of the same sequences (inf if
    not finite), and the tolerance for the dtype the model computes in (compute_dtype, else its
    weights'). Eval mode, no grad; the mode is restored. An exception from the model on `other`
    becomes DadpoError(failure.format(error=...))."""
    was_training = logprobs.training
    logprobs.eval()
    try:
        with torch.no_grad():
            expected = logprobs(reference.to(device))
            try:
                got = logprobs(other.to(device))
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # e.g. model code that cannot take position_ids boundaries or a 4D mask
                raise DadpoError(failure.format(error=f"{type(exc).__name__}: {first_line(exc)}")) from None
    finally:
        logprobs.train(was_training)
    counts = torch.bincount(reference.sequence, minlength=reference.num_sequences).clamp(min=1)
    per_token = float(((got - expected).abs() / counts.to(expected.device)).max())
    dtype = compute_dtype or next(unwrapped.model.parameters()).dtype
    # nats per token. Layout noise is ~1e-7 in fp32 and ~2e-4 in bf16; a model that lets one
    # sequence see another is off by ~1e-2 even at random init.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-3
    return (per_token if math.isfinite(per_token) else math.inf), tolerance


def check_packing(logprobs: nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                  device, where: str, unwrapped: ResponseLogprobs | None = None, *,
                  compute_dtype: torch.dtype | None = None) -> float:
    """Refuse (DadpoError) unless packed log-probs of `sequences` equal the padded ones.

    A model whose attention ignores position_ids boundaries (a custom mask, remote code, an old
    attention implementation) lets packed sequences see each other; that shows up here as a
    difference far above float rounding. Returns the largest difference per response token.
    `logprobs` may be wrapped (DDP, FSDP); then `unwrapped` is the ResponseLogprobs inside. Under
    mixed precision (autocast inside the wrapper) pass compute_dtype, e.g. torch.bfloat16: the
    tolerance follows the dtype the forward computes in.
    """
    unwrapped = unwrapped or logprobs
    decoder = unwrapped.model.get_decoder()
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise DadpoError(f"--packing: {where} does not take position_ids, so packed sequences cannot be "
                         "separated; run without --packing")
    per_token, tolerance = _layout_difference(
        logprobs, unwrapped, collate(sequences, 0), collate(sequences, 0, packed=True), device,
        f"--packing: {where} fails on a packed batch ({{error}}); run without --packing", compute_dtype)
    if per_token > tolerance:
        raise DadpoError(f"--packing: {where} lets packed sequences attend to each other (packed and padded "
                         f"log-probs differ by {per_token:.3g} nats per token); its attention ignores "
                         "position_ids boundaries, run without --packing")
    return per_token


# ---------------------------------------------------------------- prefix sharing: support and check

SHARING_ATTENTION = ("sdpa", "eager", "flex_attention")  # implementations that take a custom 4D mask


def sharing_support(model: nn.Module) -> str | None:
    """None when `model` (a causal LM) can take a prefix-shared batch, else why not (static: from
    its config and signature; check_sharing() then verifies the numbers)."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SHARING_ATTENTION:
        return f"its attention implementation {implementation} takes no custom attention mask " \
               f"(only {', '.join(SHARING_ATTENTION)} do)"
    if "position_ids" not in inspect.signature(model.get_decoder().forward).parameters:
        return "its decoder does not take position_ids"
    # A custom mask replaces the model's own masks, sliding-window ones included, and a short
    # probe would not show the difference; token mixers other than attention (recurrent, conv)
    # ignore it. Refuse any layer kind but full attention outright.
    kinds = set(getattr(config, "layer_types", None) or []) | set(getattr(config, "attention_layers", None) or [])
    other_layers = sorted(kinds - {"full_attention", "global"})  # GPT-Neo calls full attention "global"
    if other_layers:
        return f"it has {'/'.join(other_layers)} layers, which a custom attention mask cannot govern"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"it uses a sliding attention window ({window} tokens), which a custom mask would replace"
    if getattr(config, "attention_chunk_size", None):
        return "it uses chunked attention, which a custom mask would replace"
    return None


def probe_pairs(vocab_size: int) -> list[Pair]:
    """Random pairs for check_sharing (any tokenizer, any model): a long prompt first, responses
    of 1 to 16 tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    return [(ids(48), ids(16), ids(12)), (ids(5), ids(1), ids(7)), (ids(9), ids(4), ids(1)), (ids(3), ids(8), ids(8))]


def check_sharing(logprobs: nn.Module, pairs: Sequence[Pair], device, where: str,
                  unwrapped: ResponseLogprobs | None = None, *, compute_dtype: torch.dtype | None = None) -> float:
    """Refuse (DadpoError) unless prefix-shared log-probs of `pairs` (padded and packed) equal the
    unshared ones. Returns the largest difference per response token. `logprobs`, `unwrapped` and
    compute_dtype: as for check_packing."""
    unwrapped = unwrapped or logprobs
    reason = sharing_support(unwrapped.model)
    if reason:
        raise DadpoError(f"prefix sharing: {where} cannot share prompts: {reason}; run with prefix sharing off")
    unshared = collate(pair_sequences(pairs), 0)
    worst = 0.0
    for packed in (False, True):
        per_token, tolerance = _layout_difference(
            logprobs, unwrapped, unshared, collate_pairs(pairs, 0, packed=packed), device,
            f"prefix sharing: {where} fails on a prefix-shared batch ({{error}}); run with prefix sharing off",
            compute_dtype)
        if per_token > tolerance:
            raise DadpoError(f"prefix sharing: {where} computes other log-probs with a shared prompt "
                             f"(shared and unshared differ by {per_token:.3g} nats per token): it ignores a "
                             "custom 4D attention mask or does not number positions 0, 1, 2, ...; run with prefix "
                             "sharing off")
        worst = max(worst, per_token)
    return worst
