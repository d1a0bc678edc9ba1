"""dadpo sft"""

from __future__ import annotations

import click

from dadpo.cli.options import build_config, config_options
from dadpo.config import SftConfig


@click.command("sft")
@config_options(SftConfig, overrides={"out": {"help": "Run folder: model/ (the HF checkpoint), metrics.jsonl, "
                                              "eval.json, summary.json, checkpoints/."}})
def sft_command(**flags):
    """dSFT: fine-tune the student on the teacher's responses (loss on response tokens only).

    \b
    The student renders each prompt with its own chat template, exactly as cache-teacher and
    train do (tokenization rule 2: data_specs/tokenization.v2.md), and learns the teacher's
    response that follows it, as written; the loss is the mean negative log-likelihood per
    response token. The result (RUN/model) is the reference for daDPO:
      dadpo sft --pairs pairs.parquet --model ./student --out sft/ --lr 2e-5 --epochs 2
      dadpo cache-teacher --pairs pairs.parquet --teacher ./teacher --reference sft/model --out cache/
      dadpo train --cache cache/ --out run/
    Same training machinery as `dadpo train`: accelerate launch, --lora-r, --save-every/--resume,
    RUN/metrics.jsonl (loss, tokens, lr, grad_norm, tokens_per_s per step), tensorboard.
    """
    from dadpo.recipes.sft import sft
    from dadpo.tokenization import DROPPED_NAME

    summary = sft(build_config(SftConfig, flags))
    if not summary.get("main_process", True):
        return
    last, ev = summary["final_train"], summary["eval"]
    click.echo(f"trained {summary['steps']} steps on {summary['train_examples']} examples: final loss "
               f"{last['loss']:.4f} per response token")
    if ev:
        click.echo(f"eval on {summary['eval_examples']} held-out examples: loss {ev['eval_loss']:.4f} per response token")
    if summary["dropped_ids"]:
        click.echo(f"dropped {len(summary['dropped_ids'])} pairs over --max-length (ids in RUN/{DROPPED_NAME})")
    click.echo(f"model saved to {summary['model_dir']}")
