"""The training loop shared by every recipe (`dadpo train` = daDPO, `dadpo sft` = supervised).

A recipe supplies rows (a polars DataFrame, one row per training item), the model to start from
and an Objective; this module does everything else: accelerate (single process, DDP, FSDP or
DeepSpeed under `accelerate launch`), model loading (dtype, attention implementation, gradient
checkpointing, LoRA via peft), AdamW with warmup then linear/cosine/constant decay, the
deterministic global batch of every step, micro-batching with DDP no_sync, gradient clipping,
RUN/metrics.jsonl + tensorboard, a progress bar, periodic checkpoints and --resume (see
dadpo/checkpoint.py), periodic and final eval, and the final HF save.

How to write a recipe (dadpo/train.py is the daDPO one, ~150 lines):

    from dadpo.training import LoopConfig, Objective, StepOutput, run_training, split_eval

    @dataclass(kw_only=True)
    class SftConfig(LoopConfig):          # LoopConfig holds every generic flag; add your own
        data: str

    def prepare(rows: pl.DataFrame) -> MyBatch:
        # CPU only, no model: token ids -> tensors. Runs in a background thread one step ahead,
        # so reading rows is off the hot path. Use dadpo.logprobs.collate(seqs, pad_id, packed=cfg.packing).
    def compute(policy, batch: MyBatch, device) -> StepOutput:
        logps = policy(batch.responses.to(device))   # float64 [N] sums of response-token log-probs, with grad
        losses = -logps                              # e.g. SFT: sequence NLL
        return StepOutput(loss_sum=losses.sum(),
                          metric_sums={"loss": float(losses.detach().sum()), "count": len(losses)},
                          tokens=batch.responses.num_tokens)

    rows = ...                                    # polars DataFrame with an "id" column (string)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction)   # held out by a hash of the id
    summary = run_training(cfg, model=resolve_model(cfg.model, None, "--model"), tokenizer=tokenizer,
                           train_rows=train_rows, eval_rows=eval_rows,
                           objective=Objective(metric_names=("loss",), prepare=prepare, compute=compute,
                                               unit="examples"),
                           record={"data_fingerprint": ...})   # --resume refuses other data

    CLI: decorate the click command with dadpo.cli.train.loop_options() (every generic flag, minus
    any you name) and add your own --out/--model; build your config with **flags.

The contract:
  * `policy` is a dadpo.logprobs.ResponseLogprobs around the (possibly LoRA-wrapped) causal LM, as
    wrapped by accelerate. Call it exactly once per micro-batch (DDP/FSDP expect one forward per
    backward); put every sequence of the micro-batch (e.g. chosen and rejected) in that one call.
  * Global batch of a step = batch_size x grad_accum x processes rows, picked by
    global_batch_rows(): a seeded permutation per epoch, so it does not depend on the number of
    processes. Process p takes its contiguous share, cut into grad_accum micro-batches.
  * The gradient is that of  sum(loss over the global batch) / objective.normalizer(global rows)
    (default normalizer: the row count, i.e. the mean loss per row). StepOutput.loss_sum is the
    micro-batch's share of that numerator.
  * metric_sums: a sum over the micro-batch for each name in objective.metric_names, plus "count"
    (items). Sums are added over micro-batches and processes, then objective.finalize(totals)
    turns them into the logged values (default: each sum / count). "loss" must be a metric.
  * RUN/metrics.jsonl: one JSON object per optimizer step: step, the finalized metrics (computed
    before the update), lr (the rate used for this update), grad_norm, tokens_per_s, epoch.
    Eval: RUN/eval.jsonl (periodic, --eval-every) and RUN/eval.json (final), keys eval_<metric>.
  * Output: RUN/model (HF safetensors + tokenizer); with LoRA RUN/adapter (peft) and, with
    --merge-lora, RUN/model merged. RUN/summary.json is written last: a run folder with it is
    finished. The summary holds steps, train_<unit>, eval_<unit>, final_train, eval, model_dir.
  * micro_batches() and train_step() are the loop's per-step pieces (benchmarks/bench_train.py
    times them directly); build on run_training rather than on them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import polars as pl
import torch

from dadpo import checkpoint as ckpt
from dadpo.errors import DadpoError
from dadpo.logprobs import DEFAULT_CHUNK_TOKENS, ResponseLogprobs, check_packing
from dadpo.modeling import ResolvedModel, torch_dtype

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("linear", "cosine", "constant")


@dataclass(kw_only=True)
class LoopConfig:
    """Every generic training flag. Recipes subclass it (kw_only, so they can add required fields)."""

    out: str
    model: str | None = None  # the recipe decides the default
    lr: float = 5e-7
    batch_size: int = 8  # rows per process per micro-batch
    grad_accum: int = 4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # after warmup: linear | cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int | None = None  # steps; the final eval always runs
    dtype: str = "float32"  # weights
    mixed_precision: str | None = None  # no | bf16 | fp16; None: what accelerate launch/config says
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2 | ...; None: transformers' choice
    gradient_checkpointing: bool = False
    packing: bool = False  # padding-free sequences (position_ids boundaries)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # default 2 * lora_r
    lora_targets: str = "all-linear"  # comma-separated module names, or all-linear
    lora_dropout: float = 0.0
    merge_lora: bool = False
    save_every: int | None = None  # steps between checkpoints under RUN/checkpoints
    keep_checkpoints: int | None = None  # newest N kept; None: all
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"  # none | tensorboard
    trust_remote_code: bool = False
    progress: bool = True

    # Fields that do not change what is computed; --resume and sweeps ignore them when comparing runs.
    VOLATILE: ClassVar[frozenset] = frozenset({
        "out", "resume", "overwrite", "progress", "save_every", "keep_checkpoints", "report_to", "merge_lora",
        "eval_every", "batch_size", "grad_accum", "epochs", "max_steps", "gradient_checkpointing", "packing",
        "chunk_tokens", "trust_remote_code", "num_processes",
    })


@dataclass
class StepOutput:
    """What Objective.compute returns for one micro-batch."""

    loss_sum: torch.Tensor  # scalar with grad: the sum of this micro-batch's per-item losses
    metric_sums: dict[str, float]  # sum per metric name, plus "count"
    tokens: int  # tokens forwarded, for tokens_per_s


def _count(rows: pl.DataFrame) -> float:
    return float(rows.height)


def per_item_means(totals: dict[str, float]) -> dict[str, float]:
    count = max(totals["count"], 1.0)
    return {name: value / count for name, value in totals.items() if name not in ("count", "tokens")}


@dataclass
class Objective:
    """A recipe's loss: see the module docstring for the contract."""

    metric_names: tuple[str, ...]
    prepare: Callable[[pl.DataFrame], Any]
    compute: Callable[[Any, Any, torch.device], StepOutput]
    normalizer: Callable[[pl.DataFrame], float] = _count
    finalize: Callable[[dict[str, float]], dict[str, float]] = per_item_means
    unit: str = "rows"  # what a row is, for summary keys: train_<unit>, eval_<unit>
    # Optional sanity check on the freshly loaded policy (not on resume): (policy, device) ->
    # {"message": one line, ...}; written to RUN/start_check.json, printed, kept in the summary.
    start_check: Callable[[Any, torch.device], dict] | None = None


# ---------------------------------------------------------------- data order


def split_eval(rows: pl.DataFrame, eval_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hold out rows by a hash of their `id`: stable across runs, seeds and shard layouts."""
    bucket = [int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for row_id in rows["id"]]
    is_eval = pl.Series(bucket, dtype=pl.Float64) < eval_fraction
    return rows.filter(~is_eval), rows.filter(is_eval)


def global_batch_rows(rows: pl.DataFrame, step: int, global_batch: int, steps_per_epoch: int, seed: int) -> pl.DataFrame:
    """The rows of optimizer step `step` (0-based): a fresh seeded permutation each epoch, cut into
    global batches (the incomplete tail of an epoch is skipped)."""
    epoch, index = divmod(step, steps_per_epoch)
    take = _epoch_order(rows.height, seed, epoch)[index * global_batch : (index + 1) * global_batch]
    return rows[take.tolist()]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    # computed once per epoch, not once per step (a million-row permutation costs milliseconds)
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def lr_lambda(cfg: LoopConfig, total_steps: int):
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


def check_loop_flags(cfg: LoopConfig) -> None:
    """Refuse bad generic flags with one line naming the flag."""
    for flag, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum), ("--epochs", cfg.epochs)):
        if value < 1:
            raise DadpoError(f"{flag} {value}: must be at least 1")
    for flag, value in (("--max-steps", cfg.max_steps), ("--save-every", cfg.save_every),
                        ("--eval-every", cfg.eval_every), ("--keep-checkpoints", cfg.keep_checkpoints)):
        if value is not None and value < 1:
            raise DadpoError(f"{flag} {value}: must be at least 1")
    if cfg.warmup_steps < 0:
        raise DadpoError(f"--warmup-steps {cfg.warmup_steps}: must be >= 0")
    if not 0 <= cfg.eval_fraction < 1:
        raise DadpoError(f"--eval-fraction {cfg.eval_fraction}: must be in [0, 1)")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise DadpoError(f"--lr-schedule {cfg.lr_schedule}: choose {', '.join(LR_SCHEDULES)}")
    if not cfg.lr > 0:
        raise DadpoError(f"--lr {cfg.lr}: must be positive")
    if cfg.max_grad_norm < 0:
        raise DadpoError(f"--max-grad-norm {cfg.max_grad_norm}: must be >= 0 (0 turns clipping off)")
    if cfg.mixed_precision is not None and cfg.mixed_precision not in MIXED_PRECISION:
        raise DadpoError(f"--mixed-precision {cfg.mixed_precision}: choose {', '.join(MIXED_PRECISION)}")
    if cfg.report_to not in ("none", "tensorboard"):
        raise DadpoError(f"--report-to {cfg.report_to}: choose none or tensorboard")
    if cfg.lora_r < 0:
        raise DadpoError(f"--lora-r {cfg.lora_r}: must be >= 0 (0 = full fine-tuning)")
    if not 0 <= cfg.lora_dropout < 1:
        raise DadpoError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    if cfg.merge_lora and not cfg.lora_r:
        raise DadpoError("--merge-lora needs --lora-r: there is no adapter to merge")
    if cfg.chunk_tokens < 1:
        raise DadpoError(f"chunk_tokens {cfg.chunk_tokens}: must be at least 1")
    if cfg.resume and cfg.overwrite:
        raise DadpoError("--resume and --overwrite contradict each other: choose one")
    torch_dtype(cfg.dtype)


def plan_steps(cfg: LoopConfig, train_rows: int, num_processes: int, unit: str = "rows") -> tuple[int, int, int]:
    """(global batch, optimizer steps per epoch, total steps) of a run."""
    global_batch = cfg.batch_size * cfg.grad_accum * num_processes
    steps_per_epoch = train_rows // global_batch
    if steps_per_epoch == 0:
        raise DadpoError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {num_processes} "
                         f"process(es) = {global_batch} {unit} per step, but there are only {train_rows} training {unit}")
    return global_batch, steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.epochs


def run_record(cfg: LoopConfig, extra: dict) -> dict:
    """What identifies a run: every config field plus the recipe's extras (resolved model, data)."""
    return json.loads(json.dumps({**asdict(cfg), **extra}, default=str))


def run_differences(before: dict, now: dict) -> list[str]:
    """The fields that change the computation and differ, as 'name: X before, Y now'."""
    keys = sorted((set(before) | set(now)) - LoopConfig.VOLATILE)
    return [f"{key}: {json.dumps(before.get(key))} before, {json.dumps(now.get(key))} now"
            for key in keys if before.get(key) != now.get(key)]


# ---------------------------------------------------------------- model


def load_policy_model(cfg: LoopConfig, model: ResolvedModel, checkpoint: Path | None = None):
    """The causal LM to train: from `model`, or from a checkpoint's weights when resuming."""
    from transformers import AutoModelForCausalLM

    source = model.local_path
    if checkpoint is not None and not cfg.lora_r:
        source = str(checkpoint / ckpt.MODEL_DIR)
    kwargs = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types; the user needs one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DadpoError(f"--model {model.name}: cannot load the model from {source} ({message})")
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise DadpoError(f"--gradient-checkpointing: {model.name} ({type(lm).__name__}) does not support it")
        # non-reentrant: works with frozen inputs (LoRA) and with DDP without extra flags
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        lm = _with_lora(cfg, lm, checkpoint)
    return lm


def _with_lora(cfg: LoopConfig, lm, checkpoint: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(lm, str(checkpoint / ckpt.ADAPTER_DIR), is_trainable=True)
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, config)
    except ValueError as exc:
        message = str(exc).strip().splitlines()[0]
        raise DadpoError(f"--lora-targets {cfg.lora_targets}: {message}")


def _probe_sequences(vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """Random sequences for the packing check (any tokenizer, any model): a long one first, so a
    model that lets later sequences see earlier ones shows it clearly."""
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    return [(ids(48), ids(16)), (ids(5), ids(7)), (ids(9), ids(4)), (ids(3), ids(8))]


# ---------------------------------------------------------------- the loop


def run_training(cfg: LoopConfig, *, model: ResolvedModel, tokenizer, train_rows: pl.DataFrame,
                 eval_rows: pl.DataFrame, objective: Objective, record: dict | None = None) -> dict:
    """Train; return the summary (also RUN/summary.json). `record` adds recipe facts (the
    resolved model, a data fingerprint) to what --resume compares."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    check_loop_flags(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on a CPU-only machine without ACCELERATE_USE_CPU=1: N unaware copies of one run
        raise DadpoError(f"WORLD_SIZE={launched} but accelerate sees {accelerator.num_processes} process(es), so every "
                         "process would train alone into the same --out; on CPU set ACCELERATE_USE_CPU=1 "
                         "(see `dadpo train --help`)")
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and (cfg.save_every or cfg.resume):
        raise DadpoError("--save-every/--resume: checkpoints are written single-process and under DDP; under "
                         "FSDP/DeepSpeed they are not supported yet (the final model is still saved)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if cfg.grad_accum != 1:
            # the DeepSpeed engine steps inside backward; accumulating here would step every micro-batch
            raise DadpoError(f"--grad-accum {cfg.grad_accum}: under DeepSpeed use --grad-accum 1 and a larger "
                             "--batch-size or more processes")
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    out = Path(cfg.out)
    global_batch, steps_per_epoch, total_steps = plan_steps(cfg, train_rows.height, accelerator.num_processes,
                                                            objective.unit)
    record = run_record(cfg, {**(record or {}), "global_batch": global_batch, "total_steps": total_steps,
                              "num_processes": accelerator.num_processes,
                              "mixed_precision": accelerator.mixed_precision})
    start = ckpt.find_start(out, cfg.resume, cfg.overwrite, record, run_differences)
    accelerator.wait_for_everyone()  # every process has looked at RUN before the main one changes it
    if accelerator.is_main_process:
        ckpt.prepare_run_folder(out, start)
        (out / "train_config.json").write_text(json.dumps(record, indent=2))
    torch.manual_seed(cfg.seed)

    policy = ResponseLogprobs(load_policy_model(cfg, model, start), cfg.chunk_tokens)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler stays outside accelerate.prepare: accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # FSDP replaces the parameters
    if cfg.packing:
        inner = accelerator.unwrap_model(policy)
        check_packing(policy, _probe_sequences(inner.model.config.vocab_size), accelerator.device, model.name, inner)
    start_step = ckpt.load_training_state(start, optimizer, scheduler, accelerator.process_index) if start else 0
    start_check = None
    if objective.start_check is not None and start_step == 0:
        start_check = objective.start_check(policy, accelerator.device)  # every process: FSDP gathers weights
        if accelerator.is_main_process:
            (out / "start_check.json").write_text(json.dumps(start_check, indent=2))
            print(start_check["message"], flush=True)

    log = _RunLog(out, cfg, accelerator.is_main_process, start_step)

    def step_batches(step: int):
        return micro_batches(train_rows, step, cfg, global_batch, steps_per_epoch, accelerator.process_index, objective)

    last = log.last_train
    bar = _progress(cfg, accelerator, total_steps, start_step)
    with ThreadPoolExecutor(max_workers=1) as prefetch:  # reads and collates step k+1 while step k runs
        upcoming = prefetch.submit(step_batches, start_step) if start_step < total_steps else None
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            batches, normalizer = upcoming.result()
            if step + 1 < total_steps:
                upcoming = prefetch.submit(step_batches, step + 1)
            reduced, lr, grad_norm = train_step(accelerator, policy, optimizer, scheduler, trainable, objective,
                                                batches, normalizer, cfg.max_grad_norm)
            seconds = time.perf_counter() - started
            last = {"step": step + 1, **objective.finalize(reduced), "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": reduced["tokens"] / seconds, "epoch": step // steps_per_epoch}
            if accelerator.device.type == "cuda":
                last["peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            log.train(last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            # eval before the checkpoint, so a run resumed from this step has this step's eval line
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_rows.height and step + 1 < total_steps:
                log.eval(step + 1, evaluate(policy, eval_rows, objective, cfg.batch_size, accelerator))
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                ckpt.save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, out, step + 1,
                                     {"record": record, "last_train": last}, cfg.keep_checkpoints)
    bar.close()

    eval_metrics = evaluate(policy, eval_rows, objective, cfg.batch_size, accelerator) if eval_rows.height else {}
    if eval_metrics:
        log.eval(total_steps, eval_metrics)
    log.close()
    saved = ckpt.save_final(accelerator, policy, tokenizer, out, cfg, model)
    summary = {"steps": total_steps, f"train_{objective.unit}": train_rows.height,
               f"eval_{objective.unit}": eval_rows.height, "final_train": last, "eval": eval_metrics,
               "model_dir": str(saved), "resumed_from_step": start_step or None, "start_check": start_check,
               "main_process": accelerator.is_main_process}
    if accelerator.is_main_process:
        (out / "eval.json").write_text(json.dumps(eval_metrics, indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))  # last: marks the run finished
    accelerator.wait_for_everyone()
    return summary


def micro_batches(rows: pl.DataFrame, step: int, cfg: LoopConfig, global_batch: int, steps_per_epoch: int,
                  process_index: int, objective: Objective) -> tuple[list, float]:
    """Step `step`'s prepared micro-batches for process `process_index`, and the step's loss normalizer."""
    global_rows = global_batch_rows(rows, step, global_batch, steps_per_epoch, cfg.seed)
    mine = global_rows.slice(process_index * cfg.batch_size * cfg.grad_accum, cfg.batch_size * cfg.grad_accum)
    batches = [objective.prepare(mine.slice(i * cfg.batch_size, cfg.batch_size)) for i in range(cfg.grad_accum)]
    return batches, objective.normalizer(global_rows)


def train_step(accelerator, policy, optimizer, scheduler, trainable, objective: Objective, batches: list,
               normalizer: float, max_grad_norm: float) -> tuple[dict, float, float]:
    """One optimizer step over prepared micro-batches: returns (metric totals summed over
    micro-batches and processes, the lr used, the gradient norm before clipping)."""
    totals = _zero_totals(objective, accelerator.device)
    for micro, batch in enumerate(batches):
        sync = micro == len(batches) - 1  # DDP all-reduces gradients only on the last micro-batch
        with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
            result = objective.compute(policy, batch, accelerator.device)
            # DDP averages gradients over processes; scaling by processes / normalizer makes
            # the result the gradient of (global batch loss sum) / normalizer.
            accelerator.backward(result.loss_sum * accelerator.num_processes / normalizer)
        _add(totals, objective, result)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
    grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed may not report it
    return _as_dict(accelerator.reduce(totals, reduction="sum"), objective), lr, grad_norm


def evaluate(policy, rows: pl.DataFrame, objective: Objective, batch_size: int, accelerator) -> dict:
    """Finalized metrics over `rows` (split across processes, summed back), keys prefixed eval_."""
    policy.eval()
    totals = _zero_totals(objective, accelerator.device)
    share = rows[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, share.height, batch_size):
            _add(totals, objective, objective.compute(policy, objective.prepare(share.slice(start, batch_size)),
                                                      accelerator.device))
    policy.train()
    reduced = _as_dict(accelerator.reduce(totals, reduction="sum"), objective)
    return {f"eval_{k}": v for k, v in objective.finalize(reduced).items()} | {f"eval_{objective.unit}": int(reduced["count"])}


# Metric sums travel as one float64 vector (metric_names..., count, tokens): one all-reduce per step.
def _zero_totals(objective: Objective, device) -> torch.Tensor:
    return torch.zeros(len(objective.metric_names) + 2, dtype=torch.float64, device=device)


def _add(totals: torch.Tensor, objective: Objective, result: StepOutput) -> None:
    values = [result.metric_sums[name] for name in objective.metric_names]
    totals += torch.tensor(values + [result.metric_sums["count"], result.tokens], dtype=torch.float64,
                           device=totals.device)


def _as_dict(totals: torch.Tensor, objective: Objective) -> dict[str, float]:
    names = list(objective.metric_names) + ["count", "tokens"]
    return {name: float(value) for name, value in zip(names, totals.tolist())}


def _progress(cfg: LoopConfig, accelerator, total_steps: int, start_step: int):
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and accelerator.is_main_process))


@dataclass
class _RunLog:
    """RUN/metrics.jsonl, RUN/eval.jsonl and (with --report-to tensorboard) RUN/tb, main process only.
    On resume, lines past the checkpoint's step (logged before a crash) are dropped first."""

    out: Path
    cfg: LoopConfig
    active: bool
    start_step: int
    last_train: dict = field(default_factory=dict)

    def __post_init__(self):
        self.files, self.writer = {}, None
        if not self.active:
            return
        for name in ("metrics", "eval"):
            path = self.out / f"{name}.jsonl"
            kept = []
            if self.start_step and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.start_step]
            path.write_text("".join(line + "\n" for line in kept))
            if name == "metrics" and kept:
                self.last_train = json.loads(kept[-1])
            self.files[name] = open(path, "a")
        if self.cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.start_step + 1 if self.start_step else None)

    def _write(self, name: str, record: dict, prefix: str) -> None:
        if not self.active:
            return
        self.files[name].write(json.dumps(record) + "\n")
        self.files[name].flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, record["step"])
            self.writer.flush()

    def train(self, record: dict) -> None:
        self._write("metrics", record, "train")

    def eval(self, step: int, metrics: dict) -> None:
        self._write("eval", {"step": step, **metrics}, "eval")

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        if self.writer:
            self.writer.close()
