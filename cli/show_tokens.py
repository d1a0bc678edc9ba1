"""dadpo show-tokens"""

from __future__ import annotations

import sys

import click

from dadpo.cli.options import build_config, config_options
from dadpo.config import ShowTokensConfig


@click.command("show-tokens")
@config_options(ShowTokensConfig)
def show_tokens_command(**flags):
    """Show what a model will score for one pair: the rendered prompt, the chosen and rejected
    responses' tokens with their boundaries, the end of turn and the stop ids.

    \b
    The pair is tokenized by the same rule generate, sft and cache-teacher use, so a template
    that writes the wrong end of turn, doubles a BOS or swallows a space shows here before any
    model is loaded. Only the tokenizer is read. Tokens print as |tok|tok|; in a terminal they
    alternate colours, special tokens in magenta, the end of turn in red.
    Example:
      dadpo show-tokens --model Qwen/Qwen3-0.6B --pairs pairs.jsonl --row 3
    """
    from dadpo.show_tokens import render, show_tokens

    cfg = build_config(ShowTokensConfig, flags)
    view = show_tokens(cfg)
    color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
    click.echo(render(view, color=color), color=color)
