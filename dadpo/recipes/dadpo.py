"""`dadpo train`: daDPO on the student, with the teacher and the reference read from the cache.

Only the student (the policy) is loaded. Top to bottom:
    1. the cache's rows: reference token ids, reference and teacher log-probs (dadpo.cache)
    2. the trainer: accelerate, the policy, AdamW, checkpoints, logs (dadpo.training.Trainer)
    3. each step: rows -> PairBatch (one row per pair [prompt | chosen | rejected] with prefix
       sharing, else chosen and rejected as two sequences) -> the policy's sentence log-probs in
       one forward pass (dadpo.logprobs) -> dadpo.loss.dadpo_loss -> backward; then the optimizer step
    4. the final eval, the HF checkpoint, RUN/summary.json

The teacher term uses the weighted mean of the cache's teachers' log-probs (one teacher: its own),
the log of a geometric mixture of the teachers (see dadpo.loss).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from dadpo.cache import Cache, open_cache
from dadpo.cache.layout import teacher_prefix
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseBatch, collate, collate_pairs
from dadpo.loss import (METRIC_NAMES, TEACHER_DOMINANCE, LossOutput, check_betas, dadpo_loss, metric_sums,
                        teacher_dominates, teacher_term_scale, term_sizes)
from dadpo.modeling import ResolvedModel, load_tokenizer, resolve_model
from dadpo.config import LOGP_NORMS, TrainConfig
from dadpo.tokenization import pad_id_of
from dadpo.training.data import split_eval
from dadpo.training.trainer import Trainer, per_item_means



@dataclass
class PairBatch:
    """A micro-batch of pairs ready for the device."""

    responses: ResponseBatch  # n chosen sequences, then the n rejected ones
    ref_logp: torch.Tensor  # [n, 2] float64: chosen, rejected (length-normalised with --logp-norm mean)
    teacher_logp: torch.Tensor  # [n, 2] float64: the teachers' weighted mean
    policy_divisor: torch.Tensor  # [n, 2] what the policy's log-probs are divided by (1, or the token counts)


def train(cfg: TrainConfig) -> dict:
    """Run daDPO; return the summary (also RUN/summary.json)."""
    # 1. the cache
    check_betas(cfg.beta1, cfg.beta2)
    cfg.check()  # before reading anything
    if cfg.logp_norm not in LOGP_NORMS:
        raise DadpoError(f"--logp-norm {cfg.logp_norm}: choose sum or mean")
    cache = open_cache(cfg.cache)
    weights = teacher_weights(cache, cfg.teacher_weights, cfg.beta2)
    model, tokenizer = policy_start(cfg.model, cache, cfg.trust_remote_code)
    rows = cache.read(cached_columns(cache))
    rows, filtered = filter_by_teacher_margin(rows, weights, cfg.min_teacher_margin, cfg.max_teacher_margin)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)
    pad_id = pad_id_of(tokenizer)

    # 2. the trainer
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer, train_rows=train_rows.height, unit="pairs",
                      metric_names=METRIC_NAMES,
                      record={"model": model.name, "cache_fingerprint": cache_fingerprint(cache),
                              "teacher_mixture": weights}, reads={"--cache": cfg.cache})
    shared, packed = trainer.choose_layout(pairs=True)

    def make_batch(batch_rows: pl.DataFrame) -> PairBatch:
        return pair_batch(batch_rows, pad_id, weights, cfg.logp_norm, shared=shared, packed=packed)

    def evaluate() -> dict:
        totals = trainer.new_totals()
        for batch in trainer.eval_batches(eval_rows, make_batch):
            out = batch_loss(trainer.policy, batch, cfg, trainer.device)
            trainer.add(totals, metric_sums(out), batch.responses.num_tokens)
        reduced = trainer.reduce(totals)
        return {f"eval_{k}": v for k, v in per_item_means(reduced).items()} | {"eval_pairs": int(reduced["count"])}

    if cfg.start_check and trainer.start_step == 0:
        sample = rows.sample(n=min(cfg.start_check, rows.height), seed=cfg.seed)
        trainer.report_start_check(reference_check(trainer, sample, cfg, pad_id, shared))

    # 3. the steps
    for step in trainer.steps(train_rows, make_batch):
        first_step = []  # the first step's outputs (this process's pairs), for the teacher-term warning
        for batch in trainer.accumulate(step):
            out = batch_loss(trainer.policy, batch, cfg, trainer.device)
            if step.index == 0:
                first_step.append(out)
            trainer.backward(out.losses.sum(), step.normalizer, metric_sums(out), batch.responses.num_tokens)
        if first_step and (warning := teacher_term_warning(first_step, cfg.beta1, cfg.beta2)):
            trainer.say(warning)
        trainer.optimizer_step(per_item_means, evaluate)

    # 4. eval and save
    return trainer.finish(evaluate() if eval_rows.height else {}, eval_rows.height,
                          {"filtered_by_teacher_margin": filtered})


def batch_loss(policy, batch: PairBatch, cfg, device) -> LossOutput:
    """The daDPO loss of one micro-batch: the policy's log-probs of chosen and rejected in one forward."""
    logps = policy(batch.responses.to(device))
    n = batch.ref_logp.shape[0]
    divisor = batch.policy_divisor.to(device)
    ref, teacher = batch.ref_logp.to(device), batch.teacher_logp.to(device)
    return dadpo_loss(logps[:n] / divisor[:, 0], logps[n:] / divisor[:, 1], ref[:, 0], ref[:, 1],
                      teacher[:, 0], teacher[:, 1], cfg.beta1, cfg.beta2)


def teacher_term_warning(outs: list[LossOutput], beta1: float, beta2: float) -> str | None:
    """One line when the first step's loss is dominated by the teacher term (dadpo.loss.teacher_dominates:
    mean |beta2*(h_policy - h_teacher)| > 5 x max(mean |beta1*(h_policy - h_ref)|, 1)), else None."""
    if beta2 == 0:
        return None
    h_policy, h_ref, h_teacher = (torch.cat([getattr(out, name) for out in outs])
                                  for name in ("h_policy", "h_ref", "h_teacher"))
    reference, teacher = term_sizes(h_policy, h_ref, h_teacher, beta1, beta2)
    if not teacher_dominates(reference, teacher):
        return None
    # the beta2 at which the median pair's |beta2*(h_policy - h_teacher)| is 1 (h_policy in h_ref's place)
    unit = teacher_term_scale(h_policy.cpu(), h_teacher.cpu()).beta2_for_unit
    return (f"warning: the teacher term dominates step 1's loss: mean |beta2*(h_policy - h_teacher)| = {teacher:.3g} "
            f"> {TEACHER_DOMINANCE:g} x max(mean |beta1*(h_policy - h_ref)| = {reference:.3g}, 1); "
            f"--beta2 {unit:.3g} keeps it near 1 for the median pair (dadpo inspect CACHE --beta2 B)")


def pair_batch(rows: pl.DataFrame, pad_id: int, weights: dict[str, float], logp_norm: str, *, shared: bool,
               packed: bool) -> PairBatch:
    """Cached rows -> a PairBatch (CPU; runs one step ahead of training)."""
    prompts = rows["ref_prompt_ids"].to_list()
    chosen, rejected = rows["ref_chosen_ids"].to_list(), rows["ref_rejected_ids"].to_list()
    if shared:
        responses = collate_pairs(list(zip(prompts, chosen, rejected)), pad_id, packed=packed)
    else:
        responses = collate(list(zip(prompts, chosen)) + list(zip(prompts, rejected)), pad_id, packed=packed)
    column = lambda name: rows[name].to_numpy().astype(np.float64)  # noqa: E731
    mean = logp_norm == "mean"
    ref_ntok = np.stack([column("ref_ntok_chosen"), column("ref_ntok_rejected")], axis=1)
    ref = np.stack([column("ref_logp_chosen"), column("ref_logp_rejected")], axis=1) / (ref_ntok if mean else 1.0)
    teacher = np.zeros_like(ref)
    for name, weight in weights.items():
        prefix = teacher_prefix(name)
        logp = np.stack([column(f"{prefix}_logp_chosen"), column(f"{prefix}_logp_rejected")], axis=1)
        ntok = np.stack([column(f"{prefix}_ntok_chosen"), column(f"{prefix}_ntok_rejected")], axis=1)
        teacher += weight * (logp / ntok if mean else logp)  # each teacher normalised by its own token count
    return PairBatch(responses, torch.from_numpy(ref), torch.from_numpy(teacher),
                     torch.from_numpy(ref_ntok if mean else np.ones_like(ref)))


# ---------------------------------------------------------------- what the cache provides


def cached_columns(cache: Cache) -> list[str]:
    columns = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids", "ref_logp_chosen", "ref_logp_rejected",
               "ref_ntok_chosen", "ref_ntok_rejected"]
    for name in cache.teachers:
        prefix = teacher_prefix(name)
        columns += [f"{prefix}_{kind}_{side}" for kind in ("logp", "ntok") for side in ("chosen", "rejected")]
    return columns


def teacher_weights(cache: Cache, text: str | None, beta2: float) -> dict[str, float]:
    """{teacher name: weight}, weights summing to 1: --teacher-weights NAME=W,... or equal weights.
    A cache without a teacher (reference only) trains plain DPO: beta2 must be 0 there."""
    names = list(cache.teachers)
    if not names:
        if beta2 > 0:
            raise DadpoError(f"--beta2 {beta2}: the cache {cache.path} holds no teacher (it was made without --teacher), "
                             "so only plain DPO trains from it: pass --beta2 0")
        if text:
            raise DadpoError(f"--teacher-weights {text}: the cache {cache.path} holds no teacher")
        return {}
    if not text:
        return {name: 1.0 / len(names) for name in names}
    given = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in names:
            known = ", ".join(n or "(unnamed)" for n in names)
            raise DadpoError(f"--teacher-weights {text}: '{item.strip()}' is not NAME=WEIGHT for a teacher of the "
                             f"cache ({known})")
        try:
            given[name] = float(value)
        except ValueError:
            raise DadpoError(f"--teacher-weights {text}: '{value}' is not a number") from None
        if not np.isfinite(given[name]) or given[name] < 0:
            raise DadpoError(f"--teacher-weights {text}: weights must be finite numbers >= 0")
    total = sum(given.values())
    if total <= 0:
        raise DadpoError(f"--teacher-weights {text}: at least one weight must be positive")
    return {name: given.get(name, 0.0) / total for name in names}


def filter_by_teacher_margin(rows: pl.DataFrame, weights: dict[str, float], low: float | None,
                             high: float | None) -> tuple[pl.DataFrame, int]:
    """Drop pairs whose teacher margin h_te (the weighted teachers') is outside [low, high]."""
    if low is None and high is None:
        return rows, 0
    if not weights:
        raise DadpoError("--min-teacher-margin/--max-teacher-margin: the cache holds no teacher")
    if low is not None and high is not None and low > high:
        raise DadpoError(f"--min-teacher-margin {low} is above --max-teacher-margin {high}")
    margin = sum(weight * (rows[f"{teacher_prefix(name)}_logp_chosen"] - rows[f"{teacher_prefix(name)}_logp_rejected"])
                 for name, weight in weights.items())
    keep = pl.Series([True] * rows.height)
    if low is not None:
        keep = keep & (margin >= low)
    if high is not None:
        keep = keep & (margin <= high)
    kept = rows.filter(keep)
    if kept.height == 0:
        raise DadpoError(f"--min/--max-teacher-margin: every one of the {rows.height} pairs is outside the range")
    return kept, rows.height - kept.height


def policy_start(model_flag: str | None, cache: Cache, trust_remote_code: bool = False) -> tuple[ResolvedModel, object]:
    """The model training starts from (--model, default the cache's reference) and its tokenizer,
    which must tokenize as the cache's reference did: the cached token ids are in its vocabulary."""
    reference = cache.reference
    if model_flag:
        model = resolve_model(model_flag, None, "--model")
    else:
        try:
            model = resolve_model(reference["model"], reference.get("revision"), "--model")
        except DadpoError as exc:
            raise DadpoError(f"--model not given, so training would start from the cache's reference "
                             f"'{reference['model']}', which cannot be loaded ({exc}); pass --model with the "
                             "reference (the dSFT student) or another model with the same tokenizer") from None
    tokenizer = load_tokenizer(model, trust_remote_code, "--model")
    if not cache.same_reference_tokenizer(tokenizer):
        raise DadpoError(f"--model {model.name}: its tokenizer or chat template differs from the cache's reference "
                         f"({reference['model']}); the cached token ids would not match this model")
    return model, tokenizer


def cache_fingerprint(cache: Cache) -> str:
    """Identifies the cached rows (their pairs and shard contents), so --resume can refuse another cache."""
    digest = hashlib.sha256(cache.manifest["pairs"]["fingerprint"].encode())
    for shard in cache.manifest["shards"]:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()


def reference_check(trainer: Trainer, rows: pl.DataFrame, cfg: TrainConfig, pad_id: int, shared: bool) -> dict:
    """Step-0 check: re-score `rows` with the policy as loaded (the trainer's own forward pass and
    dtype) and compare with the cached reference log-probs (dadpo.verify). When training starts
    from the reference, the drift is the cache's own error and the mean implicit reward against
    the reference is ~0; a large value means another engine or dtype disagrees with training."""
    from dadpo.verify import describe, reference_drift

    drift = reference_drift(trainer.policy, rows, pad_id, trainer.device, batch_size=2 * cfg.batch_size, shared=shared)
    reward = cfg.beta1 * drift.get("signed_mean", 0.0)
    message = (f"start check, policy vs cached reference on {drift['pairs']} pairs: {describe(drift)}; "
               f"step-0 mean implicit reward vs reference {reward:+.3g}")
    return {**drift, "step0_mean_implicit_reward_vs_reference": reward, "message": message}

