"""dadpo train"""

from __future__ import annotations

import click

from dadpo.cli.options import build_config, config_options
from dadpo.config import TrainConfig


def echo_summary(summary: dict) -> None:
    if not summary.get("main_process", True):
        return  # under accelerate launch only the main process reports
    last, ev = summary["final_train"], summary["eval"]
    if summary.get("filtered_by_teacher_margin"):
        click.echo(f"left out {summary['filtered_by_teacher_margin']} pairs outside the teacher-margin range")
    click.echo(f"trained {summary['steps']} steps on {summary['train_pairs']} pairs: final loss {last['loss']:.4f}, "
               f"margin {last['margin']:.4f}, reward accuracy {last['reward_accuracy']:.2f}")
    if ev:
        click.echo(f"eval on {summary['eval_pairs']} held-out pairs: loss {ev['eval_loss']:.4f}, "
                   f"reward accuracy {ev['eval_reward_accuracy']:.2f}")
    click.echo(f"model saved to {summary['model_dir']}")


@click.command("train")
@config_options(TrainConfig)
def train_command(**flags):
    """Train the student with daDPO from a cache; only the student is loaded.

    \b
    u = beta1*(h_policy - h_ref) + beta2*(h_policy - h_teacher),  loss = -log sigmoid(u)
    where h_M = log M(chosen|x) - log M(rejected|x). beta2=0 is dDPO, beta1=0 is rDPO.
    With several teachers, log teacher(y) is their weighted mean (--teacher-weights).
    The paper's grid: beta1 in {0.01, 0.1, 1}, beta2 in {0.001, 0.01, 0.1, 1}, lr 5e-7, batch 32
    (run it with `dadpo sweep`). Each pair's prompt runs once (--prefix-sharing, on where the
    model's start-up check holds).
    \b
    Examples (global batch 32 = 8 x 4 x processes):
      dadpo train --cache cache/ --out runs/b1-0.1_b2-0.01 --beta1 0.1 --beta2 0.01
      dadpo train ... --lora-r 16 --merge-lora --gradient-checkpointing --mixed-precision bf16
      dadpo train ... --save-every 200      then, after a crash or a stop signal:  dadpo train ... --resume
    Multi-GPU (DDP; FSDP through an accelerate config file):
      accelerate launch --num_processes 8 -m dadpo.cli.main train --cache cache/ --out run/ --batch-size 4 --grad-accum 1
    Several CPU processes (gloo):
      ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m dadpo.cli.main train ...
    A stop signal (SIGTERM, SIGUSR1: what SLURM sends before pre-emption) finishes the current
    step, writes a checkpoint and exits with code 75; --resume continues.
    """
    from dadpo.recipes.dadpo import train

    echo_summary(train(build_config(TrainConfig, flags)))
