"""dadpo train"""

from __future__ import annotations

import click

from dadpo.cli.main import cli


@cli.command("train")
@click.option("--cache", required=True, help="Cache folder made by dadpo cache-teacher.")
@click.option("--out", required=True, help="Run folder: metrics.jsonl, eval.json, summary.json, model/.")
@click.option("--model", default=None, help="Policy to start from (HF id or folder). [default: the cache's reference]")
@click.option("--beta1", type=float, default=0.1, show_default=True, help="Weight of the log-ratio against the reference (dDPO term).")
@click.option("--beta2", type=float, default=0.01, show_default=True, help="Weight of the log-ratio against the teacher (0 = plain DPO).")
@click.option("--lr", type=float, default=5e-7, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Pairs per process per micro-batch.")
@click.option("--grad-accum", type=int, default=4, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the training pairs.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear warmup steps.")
@click.option("--lr-schedule", default="linear", show_default=True, help="After warmup: linear, cosine or constant.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Pairs held out (by id hash) for eval.")
@click.option("--dtype", default="float32", show_default=True, help="Policy weights dtype: float32, bfloat16, float16 or auto.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder/hub to run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(**flags):
    """Train the student with daDPO from a cache; only the student is loaded.

    \b
    u = beta1*(h_policy - h_ref) + beta2*(h_policy - h_teacher),  loss = -log sigmoid(u)
    where h_M = log M(chosen|x) - log M(rejected|x). beta2=0 is dDPO, beta1=0 is rDPO.
    The paper's grid: beta1 in {0.01, 0.1, 1}, beta2 in {0.001, 0.01, 0.1, 1}, lr 5e-7, batch 32.
    Example (batch 32 = 8 x 4):
      dadpo train --cache cache/ --out runs/b1-0.1_b2-0.01 --beta1 0.1 --beta2 0.01
    Multi-GPU: accelerate launch -m dadpo.cli.main train ...
    """
    from dadpo.train import TrainConfig, train

    quiet = flags.pop("quiet")
    summary = train(TrainConfig(**flags, progress=not quiet))
    last, ev = summary["final_train"], summary["eval"]
    click.echo(f"trained {summary['steps']} steps on {summary['train_pairs']} pairs: "
               f"final loss {last['loss']:.4f}, margin {last['margin']:.4f}, reward accuracy {last['reward_accuracy']:.2f}")
    if ev:
        click.echo(f"eval on {summary['eval_pairs']} held-out pairs: loss {ev['eval_loss']:.4f}, "
                   f"reward accuracy {ev['eval_reward_accuracy']:.2f}")
    click.echo(f"model saved to {summary['model_dir']}")
