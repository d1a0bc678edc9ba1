"""dadpo train, and the training flags every training command shares (`loop_options`)."""

from __future__ import annotations

import click

from dadpo.cli.main import cli

# Generic training flags (dadpo.training.LoopConfig), shared by train, sweep and sft; each command adds
# its own --out and --model (their help differs).
_LOOP_OPTIONS = {
    "lr": click.option("--lr", type=float, default=5e-7, show_default=True, help="Peak learning rate (AdamW)."),
    "batch_size": click.option("--batch-size", type=int, default=8, show_default=True,
                               help="Pairs per process per micro-batch."),
    "grad_accum": click.option("--grad-accum", type=int, default=4, show_default=True,
                               help="Micro-batches per optimizer step."),
    "epochs": click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the training pairs."),
    "max_steps": click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs."),
    "warmup_steps": click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear warmup steps."),
    "lr_schedule": click.option("--lr-schedule", type=click.Choice(["linear", "cosine", "constant"]),
                                default="linear", show_default=True, help="Decay after warmup."),
    "weight_decay": click.option("--weight-decay", type=float, default=0.0, show_default=True),
    "max_grad_norm": click.option("--max-grad-norm", type=float, default=1.0, show_default=True,
                                  help="Gradient clipping; 0 = off."),
    "seed": click.option("--seed", type=int, default=0, show_default=True, help="Data order and initialisation."),
    "eval_fraction": click.option("--eval-fraction", type=float, default=0.05, show_default=True,
                                  help="Pairs held out (by id hash) for eval."),
    "eval_every": click.option("--eval-every", type=int, default=None,
                               help="Also evaluate every N steps (RUN/eval.jsonl)."),
    "dtype": click.option("--dtype", default="float32", show_default=True,
                          help="Weights dtype: float32, bfloat16, float16 or auto."),
    "mixed_precision": click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
                                    help="Autocast through accelerate (fp32 weights, bf16 compute). "
                                         "[default: accelerate's config]"),
    "attn_implementation": click.option("--attn-implementation", default=None,
                                        help="sdpa, eager, flash_attention_2, ... [default: transformers']"),
    "gradient_checkpointing": click.option("--gradient-checkpointing", is_flag=True,
                                           help="Recompute activations in backward: less memory."),
    "packing": click.option("--packing", is_flag=True,
                            help="Padding-free: all sequences of a micro-batch in one row, split by position_ids "
                                 "(fastest with flash_attention_2). Checked against padding at start; refused "
                                 "where the model cannot keep packed sequences apart."),
    "lora_r": click.option("--lora-r", type=int, default=0, show_default=True,
                           help="LoRA rank (peft); 0 = full fine-tuning."),
    "lora_alpha": click.option("--lora-alpha", type=float, default=None, help="LoRA alpha. [default: 2 x rank]"),
    "lora_targets": click.option("--lora-targets", default="all-linear", show_default=True,
                                 help="Comma-separated module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj."),
    "lora_dropout": click.option("--lora-dropout", type=float, default=0.0, show_default=True),
    "merge_lora": click.option("--merge-lora", is_flag=True,
                               help="Also save RUN/model: the base with the adapter merged in."),
    "save_every": click.option("--save-every", type=int, default=None,
                               help="Checkpoint every N steps to RUN/checkpoints/step-NNNNNN "
                                    "(weights, optimizer, scheduler, RNG; safetensors + JSON)."),
    "keep_checkpoints": click.option("--keep-checkpoints", type=int, default=None,
                                     help="Keep only the newest N checkpoints."),
    "resume": click.option("--resume", is_flag=True,
                           help="Continue from RUN's newest checkpoint (same settings required)."),
    "overwrite": click.option("--overwrite", is_flag=True,
                              help="Start over in a RUN that holds an earlier run's checkpoints."),
    "report_to": click.option("--report-to", type=click.Choice(["none", "tensorboard"]), default="none",
                              show_default=True, help="tensorboard: event files in RUN/tb."),
    "trust_remote_code": click.option("--trust-remote-code", is_flag=True,
                                      help="Allow model code from the model folder/hub to run."),
    "quiet": click.option("--quiet", is_flag=True, help="No progress bar."),
}

# daDPO's own flags (dadpo.train.TrainConfig), shared by train and sweep.
_DADPO_OPTIONS = [
    click.option("--cache", required=True, help="Cache folder made by dadpo cache-teacher."),
    click.option("--model", default=None,
                 help="Policy to start from: HF id or folder, with the cache's reference tokenizer. "
                      "[default: the cache's reference]"),
    click.option("--logp-norm", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
                 help="mean: divide each model's log-prob by its own token count (length-normalised variant)."),
    click.option("--start-check", type=int, default=16, show_default=True,
                 help="Pairs re-scored before step 1 with the policy, against the cached reference log-probs: "
                      "drift (nats) and the step-0 mean implicit reward, in RUN/start_check.json. 0: off."),
]


def loop_options(*exclude: str):
    """Decorator adding the generic training flags, less those named in `exclude` (e.g. "resume")."""

    def decorate(command):
        for name, option in reversed(_LOOP_OPTIONS.items()):
            if name not in exclude:
                command = option(command)
        return command

    return decorate


def dadpo_options(command):
    for option in reversed(_DADPO_OPTIONS):
        command = option(command)
    return command


def echo_summary(summary: dict) -> None:
    if not summary.get("main_process", True):
        return  # under accelerate launch only the main process reports
    last, ev = summary["final_train"], summary["eval"]
    click.echo(f"trained {summary['steps']} steps on {summary['train_pairs']} pairs: final loss {last['loss']:.4f}, "
               f"margin {last['margin']:.4f}, reward accuracy {last['reward_accuracy']:.2f}")
    if ev:
        click.echo(f"eval on {summary['eval_pairs']} held-out pairs: loss {ev['eval_loss']:.4f}, "
                   f"reward accuracy {ev['eval_reward_accuracy']:.2f}")
    click.echo(f"model saved to {summary['model_dir']}")


@cli.command("train")
@dadpo_options
@click.option("--out", required=True, help="Run folder: metrics.jsonl, eval.json, summary.json, model/, checkpoints/.")
@click.option("--beta1", type=float, default=0.1, show_default=True, help="Weight of the log-ratio against the reference (dDPO term).")
@click.option("--beta2", type=float, default=0.01, show_default=True, help="Weight of the log-ratio against the teacher (0 = plain DPO).")
@loop_options()
def train_command(**flags):
    """Train the student with daDPO from a cache; only the student is loaded.

    \b
    u = beta1*(h_policy - h_ref) + beta2*(h_policy - h_teacher),  loss = -log sigmoid(u)
    where h_M = log M(chosen|x) - log M(rejected|x). beta2=0 is dDPO, beta1=0 is rDPO.
    The paper's grid: beta1 in {0.01, 0.1, 1}, beta2 in {0.001, 0.01, 0.1, 1}, lr 5e-7, batch 32
    (run it with `dadpo sweep`).
    \b
    Examples (global batch 32 = 8 x 4 x processes):
      dadpo train --cache cache/ --out runs/b1-0.1_b2-0.01 --beta1 0.1 --beta2 0.01
      dadpo train ... --lora-r 16 --merge-lora --gradient-checkpointing --mixed-precision bf16
      dadpo train ... --save-every 200      then, after a crash:  dadpo train ... --resume
    Multi-GPU (DDP; FSDP/DeepSpeed through an accelerate config file):
      accelerate launch --num_processes 8 -m dadpo.cli.main train --cache cache/ --out run/ --batch-size 4 --grad-accum 1
    Several CPU processes (gloo):
      ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m dadpo.cli.main train ...
    """
    from dadpo.train import TrainConfig, train

    quiet = flags.pop("quiet")
    echo_summary(train(TrainConfig(**flags, progress=not quiet)))
