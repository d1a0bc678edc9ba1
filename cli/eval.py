"""dadpo eval"""

from __future__ import annotations

import click

from dadpo.cli.options import SAMPLING_ENGINE_EXCLUDE, SAMPLING_ENGINE_OVERRIDES, build_config, config_options
from dadpo.config import EvalConfig


@click.command("eval")
@config_options(EvalConfig, exclude=SAMPLING_ENGINE_EXCLUDE, overrides={
    **SAMPLING_ENGINE_OVERRIDES,
    "engine.batch_size": {"help": "hf: prompts per model.generate call (also a local judge's and lm-eval's batch)."}})
def eval_command(**flags):
    """Did the student get better? Judged win rates against a baseline, with intervals.

    \b
    Each model's responses to --prompts (generated once with its chat template, greedy by default,
    into EVAL/responses/, or read from a responses file) are judged against the baseline's in both
    orders: a win or a loss only when both orders agree, else a tie; a reply without a verdict is
    asked again, then counted as a parse failure (never a loss). EVAL/summary.json holds, per model,
    win/tie/loss, the win rate with a 95% bootstrap interval, position consistency, a
    length-controlled rate and per-category rates; summary.md (printed), judgments.parquet and
    winrates.png sit beside it. Judgments are kept as they complete: after a crash, a stop signal
    or a judge that died, the same command continues; a finished eval re-runs for free, and adding
    a --model judges only the new one.
    Example:
      dadpo eval --prompts heldout.jsonl --baseline teacher=Qwen/Qwen2.5-7B-Instruct \\
          --model dsft=sft/model --model runs/ --judge-url http://judge:8000/v1 \\
          --judge-model Qwen/Qwen2.5-72B-Instruct --judge-api-key-env JUDGE_KEY --out eval/
    """
    from dadpo.eval.run import evaluate

    cfg = build_config(EvalConfig, flags)
    evaluate(cfg, say=click.echo)
