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
from typing import Sequence

import numpy as np
import polars as pl
import torch

from dadpo.cache import Cache, open_cache
from dadpo.cache.layout import teacher_prefix
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseLogprobs, score_pairs
from dadpo.modeling import ResolvedModel, check_device, check_dtype, load_causal_lm, model_tokenizer, resolve_model
from dadpo.config import VerifyConfig
from dadpo.pairs import decode_prompt
from dadpo.tokenization import ModelTokenizer, pad_id_of, pair_responses

REFERENCE_COLUMNS = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids",
                     "ref_logp_chosen", "ref_logp_rejected", "ref_ntok_chosen", "ref_ntok_rejected"]
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "chosen_token_ids", "chosen_token_ids_vocab", "chosen_finish_reason",
                "rejected_token_ids", "rejected_token_ids_vocab", "rejected_finish_reason"]


def teacher_columns(name: str) -> list[str]:
    prefix = teacher_prefix(name)
    return [f"{prefix}_{kind}_{side}" for kind in ("logp", "ntok") for side in ("chosen", "rejected")]


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


def _as_logprobs(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, ResponseLogprobs) or isinstance(getattr(model, "module", None), ResponseLogprobs):
        return model
    return ResponseLogprobs(model)  # a bare causal LM


def reference_drift(policy: torch.nn.Module, rows: pl.DataFrame, pad_id: int, device=None,
                    batch_size: int = 8, shared: bool = False) -> dict:
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
    pairs = list(zip(*(rows[f"ref_{name}_ids"].to_list() for name in ("prompt", "chosen", "rejected"))))
    scores = np.concatenate(score_pairs(logprobs, pairs, pad_id, device, batch_size, shared=shared))
    cached = np.concatenate([rows["ref_logp_chosen"].to_numpy(), rows["ref_logp_rejected"].to_numpy()])
    ntok = np.concatenate([rows["ref_ntok_chosen"].to_numpy(), rows["ref_ntok_rejected"].to_numpy()])
    n = rows.height
    margins = (scores[:n] - cached[:n]) - (scores[n:] - cached[n:])
    return {**drift_stats(scores, cached, ntok), "pairs": n, "margin_mean": float(margins.mean()) if n else 0.0}


def teacher_drift(teacher: torch.nn.Module, tokenizer: ModelTokenizer, rows: pl.DataFrame, pad_id: int,
                  device=None, batch_size: int = 8, where: str = "cache", name: str = "", shared: bool = False) -> dict:
    """Re-tokenize `rows` (PAIR_COLUMNS plus id and the teacher's columns) for the teacher by the one
    rule, check the token counts against its cached ntok, re-score with `teacher` and compare with
    its cached log-probs."""
    prefix = teacher_prefix(name)
    pairs, counts = [], {"chosen": [], "rejected": []}
    for row in rows.iter_rows(named=True):
        responses = dict(zip(("chosen", "rejected"), pair_responses(row)))
        label = f"{where} row id '{row['id']}' (teacher{' ' + name if name else ''})"
        prompt_ids = tokenizer.encode_prompt(decode_prompt(row["prompt"]), label)
        pairs.append([prompt_ids])
        for column in ("chosen", "rejected"):
            response_ids = tokenizer.encode_response(responses[column], prompt_ids, label)
            cached_count = row[f"{prefix}_ntok_{column}"]
            if len(response_ids) != cached_count:
                raise DadpoError(f"{label}: the teacher tokenizer gives {len(response_ids)} {column} tokens, the "
                                 f"cache recorded {prefix}_ntok_{column} = {cached_count}; the cache was made with "
                                 "another tokenizer or tokenization rule")
            pairs[-1].append(response_ids)
            counts[column].append(len(response_ids))
    logprobs = _as_logprobs(teacher)
    device = device or next(logprobs.parameters()).device
    scores = np.concatenate(score_pairs(logprobs, pairs, pad_id, device, batch_size, shared=shared))
    cached = np.concatenate([rows[f"{prefix}_logp_chosen"].to_numpy(), rows[f"{prefix}_logp_rejected"].to_numpy()])
    return {**drift_stats(scores, cached, np.array(counts["chosen"] + counts["rejected"])), "pairs": rows.height}


# ---------------------------------------------------------------- the command


def sample_rows(cache: Cache, sample: int, seed: int = 0, columns: Sequence[str] = REFERENCE_COLUMNS) -> pl.DataFrame:
    """`sample` rows (all when the cache has fewer), drawn with `seed`, in cache order."""
    rows = cache.read(list(dict.fromkeys(["pair_index", *columns])))
    if sample < rows.height:
        rows = rows.sample(n=sample, seed=seed).sort("pair_index")
    return rows


def _model_of(record: dict, role: str) -> ResolvedModel:
    try:
        return resolve_model(record["model"], record.get("revision"), f"the cache's {role}")
    except DadpoError as exc:
        hint = "pass --model with the reference or a model with its tokenizer" if role == "reference" else \
            "the teacher must be loadable from where cache-teacher found it"
        raise DadpoError(f"{exc} ({hint})") from None


def verify_cache(cfg: VerifyConfig) -> dict:
    """Check the cache's integrity, then re-score a sample. Returns {"cache", "rows", "dropped",
    "shards", "reference": {...} | None, "teacher": {...} | None}; each group holds its
    drift_stats plus the model, dtype and device it was re-scored with."""
    if cfg.sample < 0:
        raise DadpoError(f"--sample {cfg.sample}: must be 0 (integrity check only) or more")
    if cfg.batch_size < 1:
        raise DadpoError(f"--batch-size {cfg.batch_size}: must be at least 1")
    check_dtype(cfg.dtype)
    check_device(cfg.device)
    cache = open_cache(cfg.cache)  # complete, and every shard as the manifest recorded it
    totals = cache.manifest["totals"]
    result = {"cache": str(cfg.cache), "rows": totals["rows"], "dropped": totals["dropped"],
              "shards": totals["shards_done"], "reference": None, "teacher": None}
    if cfg.sample == 0:
        return result
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teachers = cache.teachers if cfg.teacher else {}
    if teachers and cache.schema_version < 2:
        raise DadpoError(f"--teacher: {cfg.cache} is a schema 1 cache, tokenized by rule 1, which this dadpo no longer "
                         "implements; only its reference columns can be re-scored")
    columns = REFERENCE_COLUMNS + (["id", *PAIR_COLUMNS] if teachers else [])
    for name in teachers:
        columns += teacher_columns(name)
    rows = sample_rows(cache, cfg.sample, cfg.seed, columns)

    reference = cache.reference
    model = resolve_model(cfg.model, None, "--model") if cfg.model else _model_of(reference, "reference")
    flag = "--model" if cfg.model else "the cache's reference"
    from dadpo.modeling import load_tokenizer

    tokenizer = load_tokenizer(model, cfg.trust_remote_code, flag)
    if not cache.same_reference_tokenizer(tokenizer):
        raise DadpoError(f"{flag} {model.name}: its tokenizer or chat template differs from the cache's reference "
                         f"({reference['model']}); the cached token ids would not match this model")
    result["reference"] = {"model": model.name, "dtype": cfg.dtype, "device": device, "cached_with": _made_by(reference),
                           **_with_loaded(model, cfg, device, flag, lambda lm, shared: reference_drift(
                               lm, rows, pad_id_of(tokenizer), device, cfg.batch_size, shared))}
    result["teachers"] = {}
    for name, record in teachers.items():
        teacher = _model_of(record, "teacher")
        label = f"the cache's teacher{' ' + name if name else ''}"
        tokenizer = model_tokenizer(teacher, label, no_chat_template=not record["chat_template"],
                                    template_kwargs=record["template_kwargs"], template_date=record["template_date"],
                                    trust_remote_code=cfg.trust_remote_code)
        if tokenizer.digest != record["tokenizer_digest"]:
            raise DadpoError(f"{label} {teacher.name}: its tokenizer or chat template differs from the one the cache "
                             "was made with; the cached token ids would not match this model")
        result["teachers"][name] = {"model": teacher.name, "dtype": cfg.dtype, "device": device,
                                    "cached_with": _made_by(record),
                                    **_with_loaded(teacher, cfg, device, label, lambda lm, shared: teacher_drift(
                                        lm, tokenizer, rows, pad_id_of(tokenizer.tokenizer), device, cfg.batch_size,
                                        where=str(cfg.cache), name=name, shared=shared))}
    result["teacher"] = result["teachers"].get("") if len(result["teachers"]) == 1 else None
    return result


def _made_by(record: dict) -> str:
    head = " fp32-head" if record.get("fp32_head") else ""
    return f"{record['backend']} {record['dtype']}{head}"


def _with_loaded(model: ResolvedModel, cfg: VerifyConfig, device: str, flag: str, measure) -> dict:
    """Load one model in the training dtype, measure (prompts shared where the model's check holds, as
    the trainer runs them), free it before the next one loads."""
    from dadpo.layout_checks import check_sharing, probe_pairs

    lm = load_causal_lm(model, cfg.dtype, cfg.trust_remote_code, flag)
    logprobs = ResponseLogprobs(lm).to(device)
    try:
        try:
            check_sharing(logprobs, probe_pairs(lm.config.get_text_config().vocab_size), device, model.name)
            shared = True
        except DadpoError:
            shared = False
        return {**measure(logprobs, shared), "prefix_shared": shared}
    finally:
        del logprobs, lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worst_drift(result: dict) -> tuple[str, float] | None:
    """(group, max |delta| per sequence) of the group that drifts most, or None when nothing was re-scored."""
    groups = {"reference": result.get("reference"),
              **{f"teacher {name}".strip(): stats for name, stats in (result.get("teachers") or {}).items()}}
    found = [(group, stats["seq_max"]) for group, stats in groups.items() if stats and stats.get("sequences")]
    return max(found, key=lambda item: item[1]) if found else None
