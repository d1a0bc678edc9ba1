"""`dadpo train`: daDPO on the student, reading the teacher and reference from the cache.

Only the student (the policy) is on the device. Per optimizer step:
    cached rows -> (prompt, chosen) and (prompt, rejected) token ids, both in one forward pass
    -> policy sentence log-probs (dadpo.logprobs) -> dadpo_loss with the cached scalars
    -> backward, clip, AdamW, LR schedule -> one line in RUN/metrics.jsonl

Works as a single process or under `accelerate launch` (DDP): the global batch of
batch_size * grad_accum * processes pairs is cut the same way whatever the process count, so
the logged losses do not depend on how the work is spread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch

from dadpo.cache import open_cache
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseLogprobs, collate
from dadpo.loss import METRIC_NAMES, check_betas, dadpo_loss, metric_sums
from dadpo.modeling import load_causal_lm, load_tokenizer, resolve_model, torch_dtype
from dadpo.tokenization import tokenizer_digest

CACHED_COLUMNS = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids", "ref_logp_chosen",
                  "ref_logp_rejected", "teacher_logp_chosen", "teacher_logp_rejected"]


@dataclass
class TrainConfig:
    cache: str
    out: str
    model: str | None = None  # default: the cache's reference model
    beta1: float = 0.1
    beta2: float = 0.01
    lr: float = 5e-7
    batch_size: int = 8  # pairs per process per micro-batch
    grad_accum: int = 4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # linear | cosine | constant (after warmup)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.05
    dtype: str = "float32"
    trust_remote_code: bool = False
    progress: bool = True


def train(cfg: TrainConfig) -> dict:
    """Run training; return the final summary (also written to RUN/summary.json)."""
    from accelerate import Accelerator
    from tqdm import tqdm

    check_betas(cfg.beta1, cfg.beta2)
    _check_flags(cfg)
    cache = open_cache(cfg.cache)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)

    model_name = cfg.model or cache.reference["model"]
    resolved = resolve_model(model_name, None if cfg.model else cache.reference["revision"], "--model")
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code, "--model")
    if tokenizer_digest(tokenizer, cache.reference["chat_template"]) != cache.reference["tokenizer_digest"]:
        raise DadpoError(f"--model {model_name}: its tokenizer or chat template differs from the cache's reference "
                         f"({cache.reference['model']}); the cached token ids would not match this model")
    policy = ResponseLogprobs(load_causal_lm(resolved, cfg.dtype, cfg.trust_remote_code, "--model"))
    policy.train()

    rows = cache.read(CACHED_COLUMNS)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)
    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    steps_per_epoch = train_rows.height // global_batch
    if steps_per_epoch == 0:
        raise DadpoError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {accelerator.num_processes} "
                         f"process(es) = {global_batch} pairs per step, but the cache has only {train_rows.height} "
                         "training pairs")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)

    out = Path(cfg.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "model": model_name}, indent=2))
    metrics_file = open(out / "metrics.jsonl", "w") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, desc="train", disable=not (cfg.progress and accelerator.is_main_process))
    last = {}
    for step in range(total_steps):
        started = time.time()
        batch_rows = global_batch_rows(train_rows, step, global_batch, steps_per_epoch, cfg.seed)
        mine = batch_rows.slice(accelerator.process_index * cfg.batch_size * cfg.grad_accum,
                                cfg.batch_size * cfg.grad_accum)
        sums = _zero_sums(accelerator.device)
        for micro in range(cfg.grad_accum):
            micro_rows = mine.slice(micro * cfg.batch_size, cfg.batch_size)
            sync = micro == cfg.grad_accum - 1  # DDP all-reduces gradients only on the last micro-batch
            with (contextlib.nullcontext() if sync else accelerator.no_sync(policy)):
                out_loss, tokens = pair_losses(policy, micro_rows, tokenizer, cfg, accelerator.device)
                # DDP averages gradients over processes; scaling by processes / global batch
                # makes the result the gradient of the global batch's mean loss.
                accelerator.backward(out_loss.losses.sum() * accelerator.num_processes / global_batch)
            _add(sums, metric_sums(out_loss), tokens, accelerator.device)
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals = accelerator.reduce(sums, reduction="sum")
        seconds = time.time() - started
        last = {"step": step + 1, **_means(totals), "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "tokens_per_s": float(totals[-1]) / seconds,
                "epoch": step // steps_per_epoch}
        if metrics_file:
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['reward_accuracy']:.2f}")
    bar.close()
    if metrics_file:
        metrics_file.close()

    eval_metrics = evaluate(policy, eval_rows, tokenizer, cfg, accelerator) if eval_rows.height else {}
    summary = {"steps": total_steps, "train_pairs": train_rows.height, "eval_pairs": eval_rows.height,
               "final_train": last, "eval": eval_metrics, "model_dir": str(out / "model")}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(policy).model
        model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        (out / "eval.json").write_text(json.dumps(eval_metrics, indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _check_flags(cfg: TrainConfig) -> None:
    for flag, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum), ("--epochs", cfg.epochs)):
        if value < 1:
            raise DadpoError(f"{flag} {value}: must be at least 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise DadpoError(f"--max-steps {cfg.max_steps}: must be at least 1")
    if not 0 <= cfg.eval_fraction < 1:
        raise DadpoError(f"--eval-fraction {cfg.eval_fraction}: must be in [0, 1)")
    if cfg.lr_schedule not in ("linear", "cosine", "constant"):
        raise DadpoError(f"--lr-schedule {cfg.lr_schedule}: choose linear, cosine or constant")
    if cfg.lr <= 0:
        raise DadpoError(f"--lr {cfg.lr}: must be positive")
    torch_dtype(cfg.dtype)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup to lr, then linear or cosine decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor


def split_eval(rows: pl.DataFrame, eval_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hold out pairs by a hash of their id: stable across runs, seeds and shard layouts."""
    bucket = [int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for pair_id in rows["id"]]
    is_eval = pl.Series(bucket) < eval_fraction
    return rows.filter(~is_eval), rows.filter(is_eval)


def global_batch_rows(rows: pl.DataFrame, step: int, global_batch: int, steps_per_epoch: int, seed: int) -> pl.DataFrame:
    """The rows of optimizer step `step`: a fresh seeded permutation each epoch, cut into
    global batches (the incomplete tail of an epoch is skipped)."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(rows.height, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    take = order[index * global_batch : (index + 1) * global_batch]
    return rows[take.tolist()]


def pair_losses(policy, rows: pl.DataFrame, tokenizer, cfg: TrainConfig, device):
    """daDPO losses for `rows`: chosen and rejected sequences share one forward pass."""
    prompts = rows["ref_prompt_ids"].to_list()
    sequences = list(zip(prompts, rows["ref_chosen_ids"].to_list())) + list(zip(prompts, rows["ref_rejected_ids"].to_list()))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(sequences, pad_id).to(device)
    logps = policy(batch)
    n = rows.height
    cached = lambda name: torch.tensor(rows[name].to_numpy(), dtype=torch.float64, device=device)  # noqa: E731
    result = dadpo_loss(logps[:n], logps[n:], cached("ref_logp_chosen"), cached("ref_logp_rejected"),
                        cached("teacher_logp_chosen"), cached("teacher_logp_rejected"), cfg.beta1, cfg.beta2)
    return result, batch.num_tokens


def evaluate(policy, rows: pl.DataFrame, tokenizer, cfg: TrainConfig, accelerator) -> dict:
    """Mean metrics over the held-out rows (split across processes, summed back)."""
    policy.eval()
    sums = _zero_sums(accelerator.device)
    share = rows[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, share.height, cfg.batch_size):
            result, tokens = pair_losses(policy, share.slice(start, cfg.batch_size), tokenizer, cfg, accelerator.device)
            _add(sums, metric_sums(result), tokens, accelerator.device)
    policy.train()
    totals = accelerator.reduce(sums, reduction="sum")
    return {f"eval_{k}": v for k, v in _means(totals).items()} | {"eval_pairs": int(totals[len(METRIC_NAMES)])}


# Metric sums travel as one float64 vector: METRIC_NAMES..., count, tokens (one all-reduce).
def _zero_sums(device) -> torch.Tensor:
    return torch.zeros(len(METRIC_NAMES) + 2, dtype=torch.float64, device=device)


def _add(sums: torch.Tensor, batch_sums: dict, tokens: int, device) -> None:
    values = [batch_sums[name] for name in METRIC_NAMES] + [batch_sums["count"], tokens]
    sums += torch.tensor(values, dtype=torch.float64, device=device)


def _means(totals: torch.Tensor) -> dict:
    count = float(totals[len(METRIC_NAMES)])
    return {name: float(totals[i]) / max(count, 1.0) for i, name in enumerate(METRIC_NAMES)}
