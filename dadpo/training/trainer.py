"""The machinery a training recipe drives: accelerate, the policy, the optimizer and schedule, the
step's rows, gradient accumulation, logs, checkpoints, stop signals, the final save.

A recipe (dadpo.recipes.dadpo, dadpo.recipes.sft) reads top to bottom:

    trainer = Trainer(cfg, model=..., tokenizer=..., train_rows=..., unit="pairs", record={...})
    for step in trainer.steps(train_rows, make_batch):          # make_batch runs one step ahead
        for batch in trainer.accumulate(step):                   # DDP syncs on the last micro-batch
            loss_sum, sums = ... trainer.policy(batch...) ...    # the recipe's own loss
            trainer.backward(loss_sum, step.normalizer, sums, tokens)
        trainer.optimizer_step(finalize, evaluate)               # clip, AdamW, log, eval, checkpoint
    return trainer.finish(evaluate)

Contract: the gradient of a step is that of sum(loss over the global batch) / step.normalizer
(default: the global batch's row count); `sums` are per-micro-batch sums of the recipe's metrics
plus "count"; they are added over micro-batches and processes (one all-reduce per step) and
`finalize(totals)` turns them into the logged values. RUN/metrics.jsonl gets one line per step:
step, the finalized metrics (computed before the update), lr, grad_norm, tokens_per_s, epoch.
Works as one process or under `accelerate launch` / torchrun (DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
import torch

from dadpo import stop
from dadpo.errors import DadpoError
from dadpo.logprobs import ResponseLogprobs
from dadpo.modeling import ResolvedModel, load_policy
from dadpo.training import checkpoint as ckpt
from dadpo.training.config import LoopConfig, run_differences
from dadpo.training.data import global_batch_rows, prefetched, process_rows
from dadpo.training.run_folder import ADAPTER_DIR, MODEL_DIR, RunFolder
from dadpo.training.runlog import RunLog, check_logs


@dataclass
class Step:
    index: int  # 0-based optimizer step
    global_rows: pl.DataFrame  # every process's rows of this step
    batches: list  # this process's prepared micro-batches
    normalizer: float  # the loss is sum over the global batch / normalizer


def lr_factor(cfg: LoopConfig, total_steps: int) -> Callable[[int], float]:
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


class Trainer:
    def __init__(self, cfg: LoopConfig, *, model: ResolvedModel, tokenizer, train_rows: int, unit: str,
                 record: dict, metric_names: tuple[str, ...], reads: dict[str, str | None] | None = None,
                 say: Callable[[str], None] = print):
        """`reads`: what else the run reads, {"--cache": path}: never removed with RUN's old contents."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        cfg.check()
        self.run = RunFolder(cfg.out)
        self.run.check_owned(fresh=not cfg.resume, reads={"--model": model.local_path, **(reads or {})})
        self.cfg, self.model, self.tokenizer, self.unit, self.metric_names = cfg, model, tokenizer, unit, metric_names
        self.train_count = train_rows
        self.accelerator = accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        _fsdp_on_cpu(accelerator)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != accelerator.num_processes:
            # e.g. torchrun on a CPU-only machine without ACCELERATE_USE_CPU=1: N unaware copies of one run
            raise DadpoError(f"WORLD_SIZE={launched} but accelerate sees {accelerator.num_processes} process(es), so "
                             "every process would train alone into the same --out; on CPU set ACCELERATE_USE_CPU=1 "
                             "(see `dadpo train --help`)")
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            if cfg.save_every or cfg.resume:
                raise DadpoError("--save-every/--resume: checkpoints are written single-process, under DDP and under "
                                 "FSDP; under DeepSpeed they are not supported (the final model is still saved)")
            if cfg.grad_accum != 1:
                # the DeepSpeed engine steps inside backward; accumulating here would step every micro-batch
                raise DadpoError(f"--grad-accum {cfg.grad_accum}: under DeepSpeed use --grad-accum 1 and a larger "
                                 "--batch-size or more processes")
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        self.say = say if accelerator.is_main_process else (lambda line: None)
        self.global_batch, self.steps_per_epoch, self.total_steps = cfg.plan(train_rows, accelerator.num_processes,
                                                                              unit)
        self.record = cfg.record({**record, "global_batch": self.global_batch, "total_steps": self.total_steps,
                                  "num_processes": accelerator.num_processes,
                                  "distributed_type": str(accelerator.distributed_type.value),
                                  "mixed_precision": accelerator.mixed_precision})
        start = ckpt.find_start(self.run.path, cfg.resume, cfg.overwrite, self.record, run_differences, self.say)
        if start is not None:
            check_logs(self.run.path)
        accelerator.wait_for_everyone()  # every process has looked at RUN before the main one changes it
        if accelerator.is_main_process:
            self.run.prepare(fresh=start is None)
            self.run.write_record(self.record)
        torch.manual_seed(cfg.seed)

        policy = ResponseLogprobs(load_policy(cfg, model, start), cfg.chunk_tokens)
        policy.train()
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        # The scheduler stays outside accelerate.prepare: accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, self.total_steps))
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP replaces the parameters
        self.inner = accelerator.unwrap_model(self.policy)  # the ResponseLogprobs, for checks and saving
        self.start_step = 0
        if start is not None:
            self._load_optimizer(ckpt.load_optimizer_state(start))
            self.start_step = ckpt.load_scheduler_and_rng(start, self.scheduler, accelerator.process_index)
        self.log = RunLog(self.run.path, accelerator.is_main_process, self.start_step, cfg.report_to == "tensorboard")
        self.last = self.log.last_train
        self.start_check = None
        self._totals = None
        self._bar = None

    # ---------------------------------------------------------------- facts for the recipe

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def report_start_check(self, result: dict) -> None:
        """A recipe's step-0 check (e.g. policy vs cached reference): RUN/start_check.json, printed."""
        self.start_check = result
        if self.is_main_process:
            self.run.write_json("start_check.json", result)
            self.say(result["message"])

    def choose_layout(self, pairs: bool) -> tuple[bool, bool]:
        """(prefix sharing, packing) for this run's batches, each checked on the loaded policy first:
        --packing is refused where the model lets packed sequences see each other; prefix sharing
        (pairs only) is on by default where its check holds, and off with a note elsewhere."""
        from dadpo.layout_checks import check_packing, check_sharing, probe_pairs

        cfg, vocab = self.cfg, self.inner.model.config.get_text_config().vocab_size
        probes = probe_pairs(vocab)
        # under autocast the forward runs in bf16/fp16 with fp32 weights: judge it by that dtype's tolerance
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        if cfg.packing:
            check_packing(self.policy, [(p, c) for p, c, _ in probes], self.device, self.model.name, self.inner,
                          compute_dtype=compute)
        if not pairs or cfg.prefix_sharing == "off":
            return False, cfg.packing
        try:  # every process: under FSDP the probe's forward gathers the weights
            check_sharing(self.policy, probes, self.device, self.model.name, self.inner, compute_dtype=compute)
            return True, cfg.packing
        except DadpoError as exc:
            reason = str(exc).removeprefix("prefix sharing: ").replace("prefix sharing off", "--prefix-sharing off")
        if cfg.prefix_sharing == "on":
            raise DadpoError(f"--prefix-sharing on: {reason}")
        self.say(f"note: prefix sharing is off for this run: {reason.split('; run with')[0]}")
        return False, cfg.packing

    # ---------------------------------------------------------------- the loop

    def steps(self, rows: pl.DataFrame, make_batch: Callable[[pl.DataFrame], object],
              normalizer: Callable[[pl.DataFrame], float] = lambda rows: float(rows.height)) -> Iterator[Step]:
        """The remaining optimizer steps; step k+1's rows are read and made into batches while step k runs."""
        cfg, accelerator = self.cfg, self.accelerator

        def make(step: int) -> Step:
            global_rows = global_batch_rows(rows, step, self.global_batch, self.steps_per_epoch, cfg.seed)
            mine = process_rows(global_rows, accelerator.process_index, cfg.batch_size, cfg.grad_accum)
            return Step(step, global_rows, [make_batch(r) for r in mine], normalizer(global_rows))

        from tqdm import tqdm

        self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not (cfg.progress and self.is_main_process))
        with stop.handling():
            for _, step in prefetched(make, range(self.start_step, self.total_steps)):
                self._started, self._step = time.perf_counter(), step.index
                self._totals = torch.zeros(len(self.metric_names) + 3, dtype=torch.float64, device=self.device)
                yield step
        self._bar.close()

    def accumulate(self, step: Step) -> Iterator:
        """The step's micro-batches; gradients are all-reduced only after the last one."""
        for micro, batch in enumerate(step.batches):
            last = micro == len(step.batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                yield batch

    def backward(self, loss_sum: torch.Tensor, normalizer: float, sums: dict[str, float], tokens: int) -> None:
        # DDP averages gradients over processes; scaling by processes / normalizer makes the result
        # the gradient of (global batch loss sum) / normalizer.
        self.accelerator.backward(loss_sum * self.accelerator.num_processes / normalizer)
        self._totals += self._as_vector(sums, tokens)

    def optimizer_step(self, finalize: Callable[[dict], dict], evaluate: Callable[[], dict] | None) -> dict:
        """Clip, step, log the step's line; eval, checkpoint and stop when due. Returns the logged line."""
        cfg, step = self.cfg, self._step
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._totals[-1] = 1.0 if stop.requested() else 0.0  # every process learns of a stop signal to any
        reduced = self._reduce(self._totals)
        seconds = time.perf_counter() - self._started
        self.last = {"step": step + 1, **finalize(reduced), "lr": lr,
                     "grad_norm": math.nan if grad_norm is None else float(grad_norm),  # DeepSpeed may not report it
                     "tokens_per_s": reduced["tokens"] / seconds, "epoch": step // self.steps_per_epoch}
        if self.device.type == "cuda":
            self.last["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log.train(self.last)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{self.last['loss']:.4f}")
        done = step + 1
        # eval before the checkpoint, so a run resumed from this step has this step's eval line
        if evaluate and cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
            self.log.eval(done, evaluate())
        stopping = reduced["stop"] > 0
        if (cfg.save_every and done % cfg.save_every == 0) or (stopping and done < self.total_steps):
            self.save_checkpoint(done)
        if stopping and done < self.total_steps:
            self.log.close()
            resume = "run the same command with --resume to continue" if not cfg.resume else \
                "run the same command again to continue"
            raise stop.Stopped(f"stopped by {stop.requested() or 'a stop signal'} after step {done} of "
                               f"{self.total_steps}; checkpoint {ckpt.checkpoint_dir(self.run.path, done)} written",
                               resume)
        return self.last

    def eval_batches(self, rows: pl.DataFrame, make_batch: Callable[[pl.DataFrame], object]) -> Iterator:
        """This process's share of `rows`, as batches, in eval mode without gradients."""
        share = rows[self.accelerator.process_index :: self.accelerator.num_processes]
        self.policy.eval()
        try:
            with torch.no_grad():
                for start in range(0, share.height, self.cfg.batch_size):
                    yield make_batch(share.slice(start, self.cfg.batch_size))
        finally:
            self.policy.train()

    def new_totals(self) -> torch.Tensor:
        return torch.zeros(len(self.metric_names) + 3, dtype=torch.float64, device=self.device)

    def add(self, totals: torch.Tensor, sums: dict[str, float], tokens: int) -> None:
        totals += self._as_vector(sums, tokens)

    def reduce(self, totals: torch.Tensor) -> dict[str, float]:
        return self._reduce(totals)

    # ---------------------------------------------------------------- saving

    def save_checkpoint(self, step: int) -> Path:
        model_state = self._full_model_state()
        optimizer_state = self._full_optimizer_state()
        return ckpt.save_checkpoint(self.accelerator, self.inner.model, model_state, optimizer_state, self.scheduler,
                                    self.tokenizer, self.run.path, step, {"record": self.record, "last_train": self.last},
                                    self.cfg.keep_checkpoints)

    def finish(self, eval_metrics: dict, eval_count: int, extra: dict | None = None) -> dict:
        """Log the final eval, save the model, write summary.json last (it marks the run finished).
        Returns the summary."""
        if eval_metrics:
            self.log.eval(self.total_steps, eval_metrics)
        self.log.close()
        saved = self._save_final()
        summary = {"steps": self.total_steps, f"train_{self.unit}": self.train_count, f"eval_{self.unit}": eval_count,
                   "final_train": self.last, "eval": eval_metrics, "model_dir": str(saved),
                   "resumed_from_step": self.start_step or None, "start_check": self.start_check,
                   **(extra or {}), "main_process": self.is_main_process}
        if self.is_main_process:
            self.run.finish(summary, eval_metrics)
        self.accelerator.wait_for_everyone()
        return summary

    def _save_final(self) -> Path:
        """RUN/model (full fine-tuning) or RUN/adapter [+ RUN/model merged]; returns the folder to use."""
        from dadpo.atomic import write_folder_atomic

        cfg, out = self.cfg, self.run.path
        state = self._full_model_state()
        result = out / (ADAPTER_DIR if cfg.lora_r and not cfg.merge_lora else MODEL_DIR)
        if self.is_main_process:
            inner = self.inner.model
            if ckpt.is_peft(inner):
                write_folder_atomic(out / ADAPTER_DIR, lambda tmp: ckpt.save_model_folder(inner, self.tokenizer, tmp,
                                                                                         state))
                if cfg.merge_lora:
                    merged = ckpt.merge_adapter(self.model.local_path, out / ADAPTER_DIR, cfg.dtype,
                                                cfg.trust_remote_code)
                    write_folder_atomic(out / MODEL_DIR, lambda tmp: ckpt.save_model_folder(merged, self.tokenizer, tmp))
            else:
                write_folder_atomic(out / MODEL_DIR, lambda tmp: ckpt.save_model_folder(inner, self.tokenizer, tmp,
                                                                                        state))
        self.accelerator.wait_for_everyone()
        return result

    # ---------------------------------------------------------------- sharded states (FSDP)

    # Checkpoints hold full (unsharded) states keyed by parameter name, whatever the layout: every
    # process takes part in the gather, the main process writes. So a run checkpointed under FSDP
    # resumes in one process and the other way round.

    def _full_model_state(self) -> dict | None:
        """The whole model's weights on the main process under FSDP/DeepSpeed (None: unsharded, the
        model's own state_dict is used). Keys are those of the wrapped LM."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif self.deepspeed:
            full = self.accelerator.get_state_dict(self.policy)
        else:
            return None
        return {key.removeprefix("model."): value for key, value in full.items()} if full else None

    def _full_optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.policy, self.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        distributed = self.accelerator.num_processes > 1
        set_optimizer_state_dict(self.policy, self.optimizer.optimizer,
                                 state if self.is_main_process or not distributed else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))

    # ---------------------------------------------------------------- metric vectors

    # Metric sums travel as one float64 vector (metric_names..., count, tokens, stop): one all-reduce per step.
    def _as_vector(self, sums: dict[str, float], tokens: int) -> torch.Tensor:
        values = [sums[name] for name in self.metric_names] + [sums["count"], tokens, 0.0]
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def _reduce(self, totals: torch.Tensor) -> dict[str, float]:
        names = list(self.metric_names) + ["count", "tokens", "stop"]
        return {name: float(v) for name, v in zip(names, self.accelerator.reduce(totals, reduction="sum").tolist())}


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate (1.15) turns ACCELERATE_USE_FSDP into FSDP only on accelerators; with
    ACCELERATE_USE_CPU=1 it quietly stays DDP. Switch such a run to FSDP, with the plugin the FSDP_*
    environment variables describe, so `accelerate launch` configs run the same on CPU processes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or \
            os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    # later AcceleratorState() calls copy the shared state back over their own: keep them agreeing
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def per_item_means(totals: dict[str, float]) -> dict[str, float]:
    count = max(totals["count"], 1.0)
    return {name: value / count for name, value in totals.items() if name not in ("count", "tokens", "stop")}
