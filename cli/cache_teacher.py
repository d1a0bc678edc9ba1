"""dadpo cache-teacher"""

from __future__ import annotations

import click

from dadpo.config import CacheTeacherConfig
from dadpo.cli.options import build_config, config_options


@click.command("cache-teacher")
@config_options(CacheTeacherConfig)
def cache_teacher_command(**flags):
    """Score every pair under the teacher(s) and the reference, once, into Parquet shards.

    \b
    Every pair is tokenized once per model by tokenization rule 2 (each model's own tokens after
    its own generation prompt; data_specs/tokenization.v2.md) before any model loads, then each
    model is scored in its own pass (never two in memory). Progress is kept per shard: re-running
    the same command after a crash, a kill -9 or a stop signal continues where it stopped.
    Re-running into a cache made with other settings (models, weights, tokenizer, template
    variables, dtype, length rule, pairs) stops and names each difference; --overwrite starts over.
    N processes (GPUs, nodes, a SLURM array) fill one folder with --num-workers N --worker-index I.
    Examples:
      dadpo cache-teacher --pairs pairs.jsonl --teacher Qwen/Qwen2.5-7B-Instruct \\
          --reference ./sft-1.5b --out cache/ --dtype bfloat16 --max-length 2048
      dadpo cache-teacher ... --teacher big=Qwen/Qwen2.5-72B-Instruct --teacher-url big=http://node7:8000 \\
          --teacher coder=Qwen/Qwen2.5-Coder-7B-Instruct        (several teachers, one served)
      dadpo cache-teacher --pairs pairs.jsonl --reference ./sft --out ref-cache/    (plain DPO: no teacher)
    """
    from dadpo.cache import cache_teacher
    from dadpo.cache.layout import DROPPED_NAME

    cfg = build_config(CacheTeacherConfig, flags)
    summary = cache_teacher(cfg)
    if cfg.plan_only:
        click.echo(f"cache {summary.path}: planned {summary.planned} shard(s) in {summary.plan_seconds:.1f} s: every "
                   "pending pair tokenizes under every model; no model was loaded (run without --plan-only to score)")
        return
    state = "complete" if summary.complete else f"{summary.shards_done} of {summary.num_shards} shards done"
    dropped = f" (ids in {summary.path}/{DROPPED_NAME})" if summary.dropped else ""
    click.echo(f"cache {summary.path}: {summary.rows} pairs cached, {summary.dropped} dropped by the length rule"
               f"{dropped}, {state} ({summary.seconds:.1f} s)")
    if summary.sequences_reused:
        click.echo(f"  sequences: {summary.sequences_scored} scored, {summary.sequences_reused} reused from "
                   "--reuse-from")
    if summary.adopted or summary.repaired:
        click.echo(f"  resumed: {summary.adopted} shard(s) found whole on disk and recorded, "
                   f"{summary.repaired} altered or missing shard(s) recomputed")
    for role, stats in summary.pass_stats.items():
        shared = f"; {stats['shared_prompt_tokens']} prompt tokens shared" if stats.get("shared_prompt_tokens") else ""
        click.echo(f"  {role}: {stats['tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:.0f} tok/s"
                   f"{shared})")
    if not summary.complete:
        click.echo("  other workers' shards are still missing; training waits for a complete cache")
