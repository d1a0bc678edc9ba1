"""`dadpo train`: daDPO on the student, reading the teacher and reference from the cache.

Only the student (the policy) is loaded. Per optimizer step (the loop is dadpo.training):
    cached rows of the step's global batch
    -> prepare(): (prompt, chosen) and (prompt, rejected) as reference-tokenizer ids, one
       ResponseBatch (padded, or packed with --packing), plus the cached teacher/reference
       log-probs and token counts as one float64 tensor           [CPU, one step ahead]
    -> compute(): policy sentence log-probs in one forward pass (dadpo.logprobs)
       -> optional length normalisation (--logp-norm mean) -> dadpo.loss.dadpo_loss
    -> backward, clip, AdamW, LR schedule -> one line in RUN/metrics.jsonl   [dadpo.training]

Works as a single process or under `accelerate launch` (DDP, FSDP, DeepSpeed): the global
batch of batch_size * grad_accum * processes pairs is cut the same way whatever the process
count, so the logged losses do not depend on how the work is spread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from dadpo.cache import Cache, open_cache
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseBatch, collate
from dadpo.loss import METRIC_NAMES, LossOutput, check_betas, dadpo_loss, metric_sums
from dadpo.modeling import ResolvedModel, load_tokenizer, resolve_model
from dadpo.tokenization import tokenizer_digest
from dadpo.training import LoopConfig, Objective, StepOutput, check_loop_flags, run_training, split_eval
from dadpo.training import global_batch_rows  # noqa: F401  (the documented data order, re-exported)

# The cached numbers a step needs, in the column order of PairBatch.cached.
CACHED_SCALARS = ["ref_logp_chosen", "ref_logp_rejected", "teacher_logp_chosen", "teacher_logp_rejected",
                  "ref_ntok_chosen", "ref_ntok_rejected", "teacher_ntok_chosen", "teacher_ntok_rejected"]
CACHED_COLUMNS = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids", *CACHED_SCALARS]
LOGP_NORMS = ("sum", "mean")


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """`dadpo train` flags: the generic ones (dadpo.training.LoopConfig) plus daDPO's own."""

    cache: str
    beta1: float = 0.1
    beta2: float = 0.01
    logp_norm: str = "sum"  # sum: sentence log-probs; mean: divided by each model's own token count
    start_check: int = 16  # pairs re-scored at step 0 against the cached reference (0: off)


@dataclass
class PairBatch:
    """A micro-batch of pairs ready for the device."""

    responses: ResponseBatch  # n chosen sequences, then the n rejected ones
    cached: torch.Tensor  # [n, len(CACHED_SCALARS)] float64


def train(cfg: TrainConfig) -> dict:
    """Run training; return the final summary (also written to RUN/summary.json)."""
    check_betas(cfg.beta1, cfg.beta2)
    check_loop_flags(cfg)  # before reading anything
    if cfg.logp_norm not in LOGP_NORMS:
        raise DadpoError(f"--logp-norm {cfg.logp_norm}: choose sum or mean")
    cache = open_cache(cfg.cache)
    model, tokenizer = policy_start(cfg.model, cache, cfg.trust_remote_code)
    rows = cache.read(CACHED_COLUMNS)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    objective = dadpo_objective(cfg, pad_id)
    if cfg.start_check:
        objective.start_check = reference_check(rows.sample(n=min(cfg.start_check, rows.height), seed=cfg.seed),
                                                cfg, pad_id)
    return run_training(cfg, model=model, tokenizer=tokenizer, train_rows=train_rows, eval_rows=eval_rows,
                        objective=objective,
                        record={"model": model.name, "cache_fingerprint": cache_fingerprint(cache)})


def policy_start(model_flag: str | None, cache: Cache, trust_remote_code: bool = False) -> tuple[ResolvedModel, object]:
    """The model training starts from (--model, default the cache's reference) and its tokenizer,
    which must be the cache's reference tokenizer: the cached token ids are in its vocabulary."""
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
    if tokenizer_digest(tokenizer, reference["chat_template"]) != reference["tokenizer_digest"]:
        raise DadpoError(f"--model {model.name}: its tokenizer or chat template differs from the cache's reference "
                         f"({reference['model']}); the cached token ids would not match this model")
    return model, tokenizer


def cache_fingerprint(cache: Cache) -> str:
    """Identifies the cached rows (their pairs and shard contents), so --resume can refuse another cache."""
    digest = hashlib.sha256(cache.manifest["pairs"]["fingerprint"].encode())
    for shard in cache.manifest["shards"]:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()


def dadpo_objective(cfg: TrainConfig, pad_id: int) -> Objective:
    """The daDPO recipe for dadpo.training: how rows become a batch, and a batch a loss."""

    def prepare(rows: pl.DataFrame) -> PairBatch:
        prompts = rows["ref_prompt_ids"].to_list()
        sequences = (list(zip(prompts, rows["ref_chosen_ids"].to_list()))
                     + list(zip(prompts, rows["ref_rejected_ids"].to_list())))
        cached = torch.from_numpy(rows.select(CACHED_SCALARS).to_numpy().astype(np.float64))
        return PairBatch(collate(sequences, pad_id, packed=cfg.packing), cached)

    def compute(policy, batch: PairBatch, device) -> StepOutput:
        logps = policy(batch.responses.to(device))  # chosen and rejected in one forward pass
        n = batch.cached.shape[0]
        result = pair_loss(logps[:n], logps[n:], batch.cached.to(device), cfg)
        return StepOutput(result.losses.sum(), metric_sums(result), batch.responses.num_tokens)

    return Objective(metric_names=METRIC_NAMES, prepare=prepare, compute=compute, unit="pairs")


def reference_check(rows: pl.DataFrame, cfg: TrainConfig, pad_id: int):
    """Step-0 check: re-score `rows` with the policy as loaded (the trainer's own forward pass and
    dtype) and compare with the cached reference log-probs (dadpo.verify). When training starts
    from the reference, the drift is the cache's own error and the mean implicit reward against
    the reference is ~0; a large value means another engine or dtype disagrees with training."""
    from dadpo.verify import describe, reference_drift

    def check(policy, device) -> dict:
        drift = reference_drift(policy, rows, pad_id, device, batch_size=cfg.batch_size)
        reward = cfg.beta1 * drift.get("signed_mean", 0.0)
        message = (f"start check, policy vs cached reference on {drift['pairs']} pairs: {describe(drift)}; "
                   f"step-0 mean implicit reward vs reference {reward:+.3g}")
        return {**drift, "step0_mean_implicit_reward_vs_reference": reward, "message": message}

    return check


def pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, cached: torch.Tensor,
              cfg: TrainConfig) -> LossOutput:
    """dadpo_loss from the policy's log-probs and the cached columns (CACHED_SCALARS order).

    --logp-norm mean divides each model's log-prob by its own token count: the policy and the
    reference by ref_ntok_* (the policy reads the reference tokenization), the teacher by teacher_ntok_*.
    """
    column = {name: cached[:, i] for i, name in enumerate(CACHED_SCALARS)}
    ref_c, ref_r = column["ref_logp_chosen"], column["ref_logp_rejected"]
    teacher_c, teacher_r = column["teacher_logp_chosen"], column["teacher_logp_rejected"]
    if cfg.logp_norm == "mean":
        policy_chosen, ref_c = policy_chosen / column["ref_ntok_chosen"], ref_c / column["ref_ntok_chosen"]
        policy_rejected, ref_r = policy_rejected / column["ref_ntok_rejected"], ref_r / column["ref_ntok_rejected"]
        teacher_c, teacher_r = teacher_c / column["teacher_ntok_chosen"], teacher_r / column["teacher_ntok_rejected"]
    return dadpo_loss(policy_chosen, policy_rejected, ref_c, ref_r, teacher_c, teacher_r, cfg.beta1, cfg.beta2)
