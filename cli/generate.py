"""dadpo generate"""

from __future__ import annotations

import dataclasses

import click

from dadpo.cli.options import SAMPLING_ENGINE_EXCLUDE, SAMPLING_ENGINE_OVERRIDES, build_config, config_options
from dadpo.config import GenerateConfig


@click.command("generate")
@config_options(GenerateConfig, exclude=SAMPLING_ENGINE_EXCLUDE, overrides=SAMPLING_ENGINE_OVERRIDES)
def generate_command(**flags):
    """Sample one teacher and one student response per prompt into a pairs file.

    \b
    Each model sees the prompt through its own chat template and variables (the same rendering
    cache-teacher and sft use) and stops at one of its stop tokens. The output follows the pairs
    spec v2 (id, prompt, chosen = teacher response, rejected = student response, in TRL's
    conversational format), with each response's sampled token ids, vocabulary digest and finish
    reason ("stop", or "length" when cut at --max-new-tokens), so cache-teacher scores exactly the
    sampled tokens. Pairs with an empty response are left out and listed in OUT.generate.json,
    which, like the Parquet metadata, records the sampling settings, models and template date.
    The two models run one after the other, never both in memory. Re-running the same command
    after a crash or a stop signal continues from the last finished chunk.
    A model served by vLLM (--teacher-url, --student-url) is sampled there: token ids go in, the
    sampled ids come back; its flag (--teacher) still names the tokenizer and template.
    Example:
      dadpo generate --prompts prompts.jsonl --teacher Qwen/Qwen3-8B --student ./pruned-student \\
          --student-template-kwargs '{"enable_thinking": false}' --out pairs.parquet --temperature 0.7
      dadpo generate ... --teacher meta-llama/Llama-3.3-70B-Instruct --teacher-url http://node7:8000 \\
          --teacher-api-key-env TEACHER_KEY
    """
    from dadpo.generate import generate_pairs

    cfg = build_config(GenerateConfig, flags)
    cfg.engine = dataclasses.replace(cfg.engine, seed=cfg.sampling.seed)  # one --seed for sampling and engine
    summary = generate_pairs(cfg)
    if summary.already_done:
        click.echo(f"{summary.path}: already complete with these settings ({summary.rows} pairs); nothing to do")
        return
    click.echo(f"wrote {summary.rows} pairs to {summary.path} ({summary.seconds:.1f} s)")
    for role, stats in summary.pass_stats.items():
        click.echo(f"  {role}: {stats['responses']} responses, {stats['tokens']} tokens in {stats['seconds']:.1f} s "
                   f"({stats['tokens_per_s']:.0f} tok/s)")
    cut = ", ".join(f"{role} {n}" for role, n in summary.truncated.items() if n)
    if cut:
        click.echo(f"  cut at --max-new-tokens (finish_reason 'length'): {cut}")
    if summary.dropped:
        click.echo(f"  left out {len(summary.dropped)} prompts with an empty response (listed in "
                   f"{summary.path}.generate.json)")
