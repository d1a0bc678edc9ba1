"""dadpo sft"""

from __future__ import annotations

import click

from dadpo.cli.main import cli
from dadpo.cli.train import loop_options


@cli.command("sft")
@click.option("--pairs", required=True, help="Pairs file (as for cache-teacher); the student learns `chosen`, the "
              "teacher's response. `rejected` is not used.")
@click.option("--out", required=True, help="Run folder: model/ (the HF checkpoint), metrics.jsonl, eval.json, "
              "summary.json, checkpoints/.")
@click.option("--max-length", type=int, default=None,
              help="Max prompt+response tokens; longer pairs are dropped (or refused). [default: the model's limit]")
@click.option("--on-overlong", type=click.Choice(["drop", "error"]), default="drop", show_default=True,
              help="drop: skip over-long pairs (ids in RUN/dropped_ids.txt); error: stop at the first one.")
@click.option("--model", required=True,
              help="Student to fine-tune: HF hub id or local folder (e.g. the pruned or small model).")
@click.option("--no-chat-template", is_flag=True, help="Plain mode: ignore the student's chat template.")
@loop_options()
def sft_command(**flags):
    """dSFT: fine-tune the student on the teacher's responses (loss on response tokens only).

    \b
    The student renders each prompt with its own chat template, exactly as cache-teacher and
    train do (dadpo.tokenization), and learns the teacher's response that follows it; the loss
    is the mean negative log-likelihood per response token. The result (RUN/model) is the
    reference for daDPO:
      dadpo sft --pairs pairs.parquet --model ./student --out sft/ --lr 2e-5 --epochs 2
      dadpo cache-teacher --pairs pairs.parquet --teacher ./teacher --reference sft/model --out cache/
      dadpo train --cache cache/ --out run/
    Same training machinery as `dadpo train`: accelerate launch, --lora-r, --save-every/--resume,
    RUN/metrics.jsonl (loss, tokens, lr, grad_norm, tokens_per_s per step), tensorboard.
    """
    from dadpo.sft import SftConfig, sft

    quiet = flags.pop("quiet")
    summary = sft(SftConfig(**flags, progress=not quiet))
    if not summary.get("main_process", True):
        return
    last, ev = summary["final_train"], summary["eval"]
    click.echo(f"trained {summary['steps']} steps on {summary['train_examples']} examples: final loss "
               f"{last['loss']:.4f} per response token")
    if ev:
        click.echo(f"eval on {summary['eval_examples']} held-out examples: loss {ev['eval_loss']:.4f} per response token")
    if summary["dropped_ids"]:
        click.echo(f"dropped {len(summary['dropped_ids'])} pairs over --max-length (ids in RUN/dropped_ids.txt)")
    click.echo(f"model saved to {summary['model_dir']}")


# The shared flags' defaults and texts are written for `train`; say what they mean here.
for _param in sft_command.params:
    if _param.name == "lr":
        _param.default = 2e-5
    elif _param.name in ("batch_size", "epochs", "eval_fraction"):
        _param.help = _param.help.replace("Pairs", "Examples").replace("pairs", "examples")
