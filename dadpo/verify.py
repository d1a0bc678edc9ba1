"""`dadpo verify-cache`: how far the cached log-probs are from the trainer's own forward pass.

The cache is scored once, often by another engine (vLLM) or in another dtype than training
runs in, and training then takes the cached numbers as exact. This module re-scores a sample
of cached rows with dadpo.logprobs.ResponseLogprobs, the computation the trainer uses, and
reports |delta| = |rescored - cached| per sequence (nats) and per token (|delta| / token count):

    reference columns (ref_logp_*)      the policy model (default: the cache's reference), on the
                                        cached reference token ids, exactly as train feeds them
    teacher columns (teacher_logp_*)    the cache's teacher, re-tokenized by the one rule
                                        (dadpo.tokenization); its token counts must equal the cached ones

reference_drift() takes an already-loaded model, so `train` can run the same check at start on
the policy it has in memory (no second copy): at step 0 the policy is the reference, so the
drift is the cache's own error, and beta1 * signed_mean is the step-0 mean implicit reward
against the reference (~0 when the cache is faithful).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import torch

from dadpo.cache import Cache, open_cache
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseLogprobs, collate
from dadpo.modeling import ResolvedModel, check_dtype, load_causal_lm, load_tokenizer, resolve_model
from dadpo.pairs import prompt_messages
from dadpo.tokenization import tokenize_example, tokenizer_digest

REFERENCE_COLUMNS = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids",
                     "ref_logp_chosen", "ref_logp_rejected", "ref_ntok_chosen", "ref_ntok_rejected"]
TEACHER_COLUMNS = ["prompt", "chosen", "rejected", "teacher_logp_chosen", "teacher_logp_rejected",
                   "teacher_ntok_chosen", "teacher_ntok_rejected"]


@dataclass
class VerifyConfig:
    cache: str
    sample: int = 64  # rows (pairs) to re-score; 0: integrity check only
    model: str | None = None  # policy for the reference columns; None: the cache's reference
    teacher: bool = False  # also re-score the teacher columns with the cache's teacher
    dtype: str = "float32"  # the trainer's default --dtype
    batch_size: int = 8
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    trust_remote_code: bool = False


# ---------------------------------------------------------------- the statistics


def drift_stats(rescored: np.ndarray, cached: np.ndarray, num_tokens: np.ndarray) -> dict:
    """|rescored - cached| per sequence (nats) and per token: mean, p95, max; plus the signed mean."""
    delta = np.asarray(rescored, dtype=np.float64) - np.asarray(cached, dtype=np.float64)
    if delta.size == 0:
        return {"sequences": 0}
    per_sequence = np.abs(delta)
    per_token = per_sequence / np.maximum(np.asarray(num_tokens, dtype=np.float64), 1)
    return {
        "sequences": int(delta.size),
        "seq_mean": float(per_sequence.mean()), "seq_p95": float(np.percentile(per_sequence, 95)),
        "seq_max": float(per_sequence.max()),
        "tok_mean": float(per_token.mean()), "tok_p95": float(np.percentile(per_token, 95)),
        "tok_max": float(per_token.max()),
        "signed_mean": float(delta.mean()),
    }


def describe(stats: dict) -> str:
    """The statistics as one line of text (CLI output, train logs)."""
    if not stats.get("sequences"):
        return "no rows to re-score"
    return (f"|delta| per sequence mean {stats['seq_mean']:.3g} p95 {stats['seq_p95']:.3g} "
            f"max {stats['seq_max']:.3g} nats; per token mean {stats['tok_mean']:.3g} p95 {stats['tok_p95']:.3g} "
            f"max {stats['tok_max']:.3g} nats; signed mean {stats['signed_mean']:+.3g} "
            f"({stats['sequences']} sequences)")


# ---------------------------------------------------------------- scoring with the trainer's computation


def score_sequences(logprobs: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                    pad_id: int, device, batch_size: int = 8) -> np.ndarray:
    """float64 log pi(response | prompt) per sequence, in input order, from a ResponseLogprobs
    (possibly wrapped by accelerate). Runs in eval mode, no grad; the mode is restored after."""
    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    result = np.empty(len(sequences), dtype=np.float64)
    was_training = logprobs.training
    logprobs.eval()  # no dropout: the cached numbers were computed without it
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                batch = collate([sequences[i] for i in indices], pad_id).to(device)
                result[indices] = logprobs(batch).double().cpu().numpy()
    finally:
        logprobs.train(was_training)
    return result


def _as_logprobs(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, ResponseLogprobs) or isinstance(getattr(model, "module", None), ResponseLogprobs):
        return model
    return ResponseLogprobs(model)  # a bare causal LM


def reference_drift(policy: torch.nn.Module, rows: pl.DataFrame, pad_id: int, device=None,
                    batch_size: int = 8) -> dict:
    """Re-score the cached reference token ids of `rows` with `policy` and compare with ref_logp_*.

    policy: a ResponseLogprobs (as train holds it, possibly accelerate-wrapped) or a bare causal
    LM, already loaded and on `device` (default: the device of its first parameter). rows: cache
    rows with REFERENCE_COLUMNS (sample_rows). Returns drift_stats plus "pairs" and "margin_mean",
    the mean of (h_policy - h_ref) over the pairs: beta1 * margin_mean is the reference part of the
    mean daDPO margin u at this policy, and beta1 * signed_mean the mean implicit reward against
    the reference (both ~0 at step 0, when the policy is the reference and the cache is faithful).
    Under FSDP or DeepSpeed ZeRO-3 every process must call it on the same rows (the forward
    gathers sharded weights); under DDP or one process, any process may call it alone.
    """
    logprobs = _as_logprobs(policy)
    device = device or next(logprobs.parameters()).device
    prompts = rows["ref_prompt_ids"].to_list()
    chosen, rejected = rows["ref_chosen_ids"].to_list(), rows["ref_rejected_ids"].to_list()
    scores = score_sequences(logprobs, list(zip(prompts, chosen)) + list(zip(prompts, rejected)), pad_id, device,
                             batch_size)
    cached = np.concatenate([rows["ref_logp_chosen"].to_numpy(), rows["ref_logp_rejected"].to_numpy()])
    ntok = np.concatenate([rows["ref_ntok_chosen"].to_numpy(), rows["ref_ntok_rejected"].to_numpy()])
    n = rows.height
    margins = (scores[:n] - cached[:n]) - (scores[n:] - cached[n:])
    return {**drift_stats(scores, cached, ntok), "pairs": n, "margin_mean": float(margins.mean()) if n else 0.0}


def teacher_drift(teacher: torch.nn.Module, tokenizer, chat: bool, rows: pl.DataFrame, pad_id: int,
                  device=None, batch_size: int = 8, where: str = "cache") -> dict:
    """Re-tokenize `rows` (TEACHER_COLUMNS plus id) for the teacher by the one rule, check the
    token counts against teacher_ntok_*, re-score with `teacher` and compare with teacher_logp_*."""
    sequences, counts = {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
    for pair_id, prompt_json, chosen, rejected, ntok_c, ntok_r in rows.select(
        "id", "prompt", "chosen", "rejected", "teacher_ntok_chosen", "teacher_ntok_rejected"
    ).iter_rows():
        prompt = prompt_messages(prompt_json)
        for column, response, cached_count in (("chosen", chosen, ntok_c), ("rejected", rejected, ntok_r)):
            prompt_ids, response_ids = tokenize_example(tokenizer, prompt, response, chat,
                                                        f"{where} row id '{pair_id}' (teacher)")
            if len(response_ids) != cached_count:
                raise DadpoError(f"{where} row id '{pair_id}': the teacher tokenizer gives {len(response_ids)} "
                                 f"{column} tokens, the cache recorded teacher_ntok_{column} = {cached_count}; "
                                 "the cache was made with another tokenizer or tokenization rule")
            sequences[column].append((prompt_ids, response_ids))
            counts[column].append(len(response_ids))
    logprobs = _as_logprobs(teacher)
    device = device or next(logprobs.parameters()).device
    scores = score_sequences(logprobs, sequences["chosen"] + sequences["rejected"], pad_id, device, batch_size)
    cached = np.concatenate([rows["teacher_logp_chosen"].to_numpy(), rows["teacher_logp_rejected"].to_numpy()])
    return {**drift_stats(scores, cached, np.array(counts["chosen"] + counts["rejected"])), "pairs": rows.height}


# ---------------------------------------------------------------- the command


def sample_rows(cache: Cache, sample: int, seed: int = 0, columns: Sequence[str] = REFERENCE_COLUMNS) -> pl.DataFrame:
    """`sample` rows (all when the cache has fewer), drawn with `seed`, in cache order."""
    rows = cache.read(list(dict.fromkeys(["pair_index", *columns])))
    if sample < rows.height:
        rows = rows.sample(n=sample, seed=seed).sort("pair_index")
    return rows


def pad_id_of(tokenizer) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def _model_of(record: dict, role: str) -> ResolvedModel:
    try:
        return resolve_model(record["model"], record.get("revision"), f"the cache's {role}")
    except DadpoError as exc:
        hint = "pass --model with the reference or a model with its tokenizer" if role == "reference" else \
            "the teacher must be loadable from where cache-teacher found it"
        raise DadpoError(f"{exc} ({hint})") from None


def _check_tokenizer(tokenizer, record: dict, model: ResolvedModel, flag: str, role: str) -> None:
    if tokenizer_digest(tokenizer, record["chat_template"]) != record["tokenizer_digest"]:
        raise DadpoError(f"{flag} {model.name}: its tokenizer or chat template differs from the cache's {role} "
                         f"({record['model']}); the cached token ids would not match this model")


def verify_cache(cfg: VerifyConfig) -> dict:
    """Check the cache's integrity, then re-score a sample. Returns {"cache", "rows", "dropped",
    "shards", "reference": {...} | None, "teacher": {...} | None}; each group holds its
    drift_stats plus the model, dtype and device it was re-scored with."""
    if cfg.sample < 0:
        raise DadpoError(f"--sample {cfg.sample}: must be 0 (integrity check only) or more")
    if cfg.batch_size < 1:
        raise DadpoError(f"--batch-size {cfg.batch_size}: must be at least 1")
    check_dtype(cfg.dtype)
    cache = open_cache(cfg.cache)  # complete, and every shard as the manifest recorded it
    totals = cache.manifest["totals"]
    result = {"cache": str(cfg.cache), "rows": totals["rows"], "dropped": totals["dropped"],
              "shards": totals["shards_done"], "reference": None, "teacher": None}
    if cfg.sample == 0:
        return result
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    columns = REFERENCE_COLUMNS + (TEACHER_COLUMNS if cfg.teacher else [])
    rows = sample_rows(cache, cfg.sample, cfg.seed, columns)

    reference = cache.reference
    model = resolve_model(cfg.model, None, "--model") if cfg.model else _model_of(reference, "reference")
    flag = "--model" if cfg.model else "the cache's reference"
    tokenizer = load_tokenizer(model, cfg.trust_remote_code, flag)
    _check_tokenizer(tokenizer, reference, model, flag, "reference")
    result["reference"] = {"model": model.name, "dtype": cfg.dtype, "device": device, "cached_with": _made_by(reference),
                           **_with_loaded(model, cfg, device, flag, lambda lm: reference_drift(
                               lm, rows, pad_id_of(tokenizer), device, cfg.batch_size))}
    if cfg.teacher:
        record = cache.teacher
        teacher = _model_of(record, "teacher")
        tokenizer = load_tokenizer(teacher, cfg.trust_remote_code, "the cache's teacher")
        _check_tokenizer(tokenizer, record, teacher, "the cache's teacher", "teacher")
        result["teacher"] = {"model": teacher.name, "dtype": cfg.dtype, "device": device, "cached_with": _made_by(record),
                             **_with_loaded(teacher, cfg, device, "the cache's teacher", lambda lm: teacher_drift(
                                 lm, tokenizer, record["chat_template"], rows, pad_id_of(tokenizer), device,
                                 cfg.batch_size, where=str(cfg.cache)))}
    return result


def _made_by(record: dict) -> str:
    head = " fp32-head" if record.get("fp32_head") else ""
    return f"{record['backend']} {record['dtype']}{head}"


def _with_loaded(model: ResolvedModel, cfg: VerifyConfig, device: str, flag: str, measure) -> dict:
    """Load one model in the training dtype, measure, free it before the next one loads."""
    lm = load_causal_lm(model, cfg.dtype, cfg.trust_remote_code, flag)
    logprobs = ResponseLogprobs(lm).to(device)
    try:
        return measure(logprobs)
    finally:
        del logprobs, lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worst_drift(result: dict) -> tuple[str, float] | None:
    """(group, max |delta| per sequence) of the group that drifts most, or None when nothing was re-scored."""
    found = [(group, result[group]["seq_max"]) for group in ("reference", "teacher")
             if result.get(group) and result[group].get("sequences")]
    return max(found, key=lambda item: item[1]) if found else None
