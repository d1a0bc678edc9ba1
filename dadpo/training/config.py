"""Every generic training flag, declared once: its default and its help (dadpo.options.option).

Recipes (dadpo.recipes.dadpo, dadpo.recipes.sft) subclass LoopConfig and add their own fields, or
declare a field again with their own default (e.g. sft's learning rate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from dadpo.errors import DadpoError
from dadpo.options import REQUIRED, option

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("linear", "cosine", "constant")
PREFIX_SHARING = ("auto", "on", "off")
# lm_head rows per chunk (ResponseLogprobs): 4096 tokens x 152k vocab x 4 bytes is 2.5 GB at Qwen2.5
# sizes, the most we are willing to hold at once.
DEFAULT_CHUNK_TOKENS = 4096


@dataclass(kw_only=True)
class LoopConfig:
    """Every generic training flag. Recipes subclass it (kw_only, so they can add required fields)."""

    out: str = option(REQUIRED, "Run folder: metrics.jsonl, eval.json, summary.json, model/, checkpoints/.")
    model: str | None = option(None, "Model to train: HF hub id or local folder.")
    lr: float = option(5e-7, "Peak learning rate (AdamW).")
    batch_size: int = option(8, "Pairs per process per micro-batch.")
    grad_accum: int = option(4, "Micro-batches per optimizer step.")
    epochs: int = option(1, "Passes over the training pairs.")
    max_steps: int | None = option(None, "Optimizer steps; overrides --epochs.")
    warmup_steps: int = option(0, "Linear warmup steps.")
    lr_schedule: str = option("linear", "Decay after warmup.", choices=LR_SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping; 0 = off.")
    seed: int = option(0, "Data order and initialisation.")
    eval_fraction: float = option(0.05, "Pairs held out (by id hash) for eval.")
    eval_every: int | None = option(None, "Also evaluate every N steps (RUN/eval.jsonl).")
    dtype: str = option("float32", "Weights dtype: float32, bfloat16, float16 or auto.")
    mixed_precision: str | None = option(None, "Autocast through accelerate (fp32 weights, bf16 compute).",
                                         choices=MIXED_PRECISION, default_text="accelerate's config")
    attn_implementation: str | None = option(None, "sdpa, eager, flex_attention, flash_attention_2, ...",
                                             default_text="transformers'")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward: less memory.")
    prefix_sharing: str = option(
        "auto", "Run each pair's prompt once: chosen and rejected share it in one row and attend to it, not to "
        "each other. auto: on where the start-up check holds (else off, with a note); on: refuse a model that "
        "cannot keep them apart; off: chosen and rejected as separate sequences.", choices=PREFIX_SHARING)
    packing: bool = option(False, "Padding-free: all sequences of a micro-batch in one row (fastest with "
                           "flash_attention_2). Checked against padding at start; refused where the model "
                           "cannot keep packed sequences apart.")
    chunk_tokens: int = option(DEFAULT_CHUNK_TOKENS, "lm_head rows per chunk.", cli=False)
    lora_r: int = option(0, "LoRA rank (peft); 0 = full fine-tuning.")
    lora_alpha: float | None = option(None, "LoRA alpha.", default_text="2 x rank")
    lora_targets: str = option("all-linear", "Comma-separated module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    merge_lora: bool = option(False, "Also save RUN/model: the base with the adapter merged in.")
    save_every: int | None = option(None, "Checkpoint every N steps to RUN/checkpoints/step-NNNNNN (weights, optimizer, "
                                    "scheduler, RNG; safetensors + JSON). A stop signal (SIGTERM, SIGUSR1) also "
                                    "writes one.")
    keep_checkpoints: int | None = option(None, "Keep only the newest N checkpoints.")
    resume: bool = option(False, "Continue from RUN's newest checkpoint (same settings required).")
    overwrite: bool = option(False, "Start over in a RUN that holds an earlier run's checkpoints.")
    report_to: str = option("none", "tensorboard: event files in RUN/tb.", choices=("none", "tensorboard"))
    trust_remote_code: bool = option(False, "Allow model code from the model folder/hub to run.")
    progress: bool = option(True, "Progress bar.", cli=False)

    # Fields that do not change what is computed; --resume and sweeps ignore them when comparing runs.
    VOLATILE: ClassVar[frozenset] = frozenset({
        "out", "resume", "overwrite", "progress", "save_every", "keep_checkpoints", "report_to", "merge_lora",
        "eval_every", "batch_size", "grad_accum", "epochs", "max_steps", "gradient_checkpointing", "packing",
        "prefix_sharing", "chunk_tokens", "trust_remote_code", "num_processes", "distributed_type",
    })

    def check(self) -> None:
        """Refuse bad generic flags with one line naming the flag (before anything is read)."""
        for flag, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--epochs", self.epochs)):
            if value < 1:
                raise DadpoError(f"{flag} {value}: must be at least 1")
        for flag, value in (("--max-steps", self.max_steps), ("--save-every", self.save_every),
                            ("--eval-every", self.eval_every), ("--keep-checkpoints", self.keep_checkpoints)):
            if value is not None and value < 1:
                raise DadpoError(f"{flag} {value}: must be at least 1")
        if self.warmup_steps < 0:
            raise DadpoError(f"--warmup-steps {self.warmup_steps}: must be >= 0")
        if not 0 <= self.eval_fraction < 1:
            raise DadpoError(f"--eval-fraction {self.eval_fraction}: must be in [0, 1)")
        for flag, value, allowed in (("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("--prefix-sharing", self.prefix_sharing, PREFIX_SHARING),
                                     ("--report-to", self.report_to, ("none", "tensorboard"))):
            if value not in allowed:
                raise DadpoError(f"{flag} {value}: choose {', '.join(allowed)}")
        if not self.lr > 0:
            raise DadpoError(f"--lr {self.lr}: must be positive")
        if self.max_grad_norm < 0:
            raise DadpoError(f"--max-grad-norm {self.max_grad_norm}: must be >= 0 (0 turns clipping off)")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise DadpoError(f"--mixed-precision {self.mixed_precision}: choose {', '.join(MIXED_PRECISION)}")
        if self.lora_r < 0:
            raise DadpoError(f"--lora-r {self.lora_r}: must be >= 0 (0 = full fine-tuning)")
        if not 0 <= self.lora_dropout < 1:
            raise DadpoError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if self.merge_lora and not self.lora_r:
            raise DadpoError("--merge-lora needs --lora-r: there is no adapter to merge")
        if self.chunk_tokens < 1:
            raise DadpoError(f"chunk_tokens {self.chunk_tokens}: must be at least 1")
        if self.resume and self.overwrite:
            raise DadpoError("--resume and --overwrite contradict each other: choose one")
        from dadpo.modeling import check_dtype

        check_dtype(self.dtype)

    def plan(self, train_rows: int, num_processes: int, unit: str = "rows") -> tuple[int, int, int]:
        """(global batch, optimizer steps per epoch, total steps) of a run."""
        global_batch = self.batch_size * self.grad_accum * num_processes
        steps_per_epoch = train_rows // global_batch
        if steps_per_epoch == 0:
            raise DadpoError(f"--batch-size {self.batch_size} x --grad-accum {self.grad_accum} x {num_processes} "
                             f"process(es) = {global_batch} {unit} per step, but there are only {train_rows} "
                             f"training {unit}")
        return global_batch, steps_per_epoch, self.max_steps or steps_per_epoch * self.epochs

    def record(self, extra: dict) -> dict:
        """What identifies a run: every config field plus the recipe's extras (resolved model, data)."""
        import json

        return json.loads(json.dumps({**asdict(self), **extra}, default=str))


def run_differences(before: dict, now: dict) -> list[str]:
    """The fields that change the computation and differ, as 'name: X before, Y now'."""
    import json

    keys = sorted((set(before) | set(now)) - LoopConfig.VOLATILE)
    return [f"{key}: {json.dumps(before.get(key))} before, {json.dumps(now.get(key))} now"
            for key in keys if before.get(key) != now.get(key)]
