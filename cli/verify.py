"""dadpo verify-cache"""

from __future__ import annotations

import sys

import click

from dadpo.cli.main import cli


@cli.command("verify-cache")
@click.argument("cache_arg", metavar="[CACHE]", required=False)
@click.option("--cache", default=None, help="Cache folder (made by dadpo cache-teacher); or give it as the argument.")
@click.option("--sample", type=int, default=64, show_default=True,
              help="Pairs to re-score (all when the cache has fewer); 0 checks integrity only.")
@click.option("--model", default=None, help="Policy for the reference columns: HF hub id or local folder with the "
              "reference's tokenizer. [default: the cache's reference]")
@click.option("--teacher", is_flag=True, help="Also re-score the teacher columns with the cache's teacher.")
@click.option("--dtype", default="float32", show_default=True,
              help="Dtype to re-score in: the one you train in (float32, bfloat16, float16).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default=None, help="Device (default: cuda if available, else cpu).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the row sample.")
@click.option("--max-drift", type=float, default=None,
              help="Exit 1 when the largest per-sequence |delta| (nats) of a checked column group exceeds this.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder/hub to run.")
def verify_cache_command(cache_arg, cache, max_drift, **flags):
    """Check a cache, and measure how far its log-probs are from the trainer's own forward pass.

    \b
    1. Integrity: the cache is complete and every shard's size, checksum, row count and
       columns are as the manifest recorded them.
    2. Drift: a sample of rows is re-scored with the computation `dadpo train` uses (HF, the
       training --dtype) and compared with the cached log-probs:
         reference  ref_logp_*      under --model (default: the cache's reference), on the
                                    cached reference token ids
         teacher    teacher_logp_*  under the cache's teacher (with --teacher), re-tokenized by
                                    the tokenization rule; token counts must match the cache
       One line per column group: mean, p95 and max of |delta| per sequence and per token.
    A cache scored by vLLM or in bfloat16 drifts by rounding; a large drift means the cache
    does not describe the model you train against. Exit 0 unless --max-drift is exceeded (1).
    Example:
      dadpo verify-cache --cache cache/ --sample 128 --teacher --max-drift 0.05
    """
    from dadpo.errors import DadpoError
    from dadpo.verify import VerifyConfig, describe, verify_cache, worst_drift

    if cache_arg and cache and cache_arg != cache:
        raise DadpoError(f"verify-cache: two caches given ({cache_arg} and --cache {cache}); give one")
    path = cache or cache_arg
    if not path:
        raise click.UsageError("give the cache folder: dadpo verify-cache --cache DIR")
    if max_drift is not None and not max_drift >= 0:
        raise DadpoError(f"--max-drift {max_drift}: must be a number >= 0")
    result = verify_cache(VerifyConfig(cache=path, **flags))
    click.echo(f"cache {path}: complete, {result['shards']} shards verified, {result['rows']} pairs, "
               f"{result['dropped']} dropped by the length rule")
    for group, columns in (("reference", "ref_logp_*"), ("teacher", "teacher_logp_*")):
        stats = result[group]
        if stats:
            click.echo(f"{group} {columns} (cached: {stats['cached_with']}) vs {stats['model']} "
                       f"[{stats['dtype']}, {stats['device']}], {stats['pairs']} pairs: {describe(stats)}")
    worst = worst_drift(result)
    if max_drift is not None and worst and worst[1] > max_drift:
        click.echo(f"error: {worst[0]} drift {worst[1]:.3g} nats per sequence (max) exceeds --max-drift {max_drift}",
                   err=True)
        sys.exit(1)
