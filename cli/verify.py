"""dadpo verify-cache"""

from __future__ import annotations

import sys

import click

from dadpo.cli.options import build_config, config_options
from dadpo.config import VerifyConfig


@click.command("verify-cache")
@click.argument("cache_arg", metavar="[CACHE]", required=False)
@click.option("--cache", default=None, help="Cache folder (made by dadpo cache-teacher); or give it as the argument.")
@config_options(VerifyConfig, exclude=("cache",))
@click.option("--max-drift", type=float, default=None,
              help="Exit 1 when the largest per-sequence |delta| (nats) of a checked column group exceeds this.")
def verify_cache_command(cache_arg, cache, max_drift, **flags):
    """Check a cache, and measure how far its log-probs are from the trainer's own forward pass.

    \b
    1. Integrity: the cache is complete and every shard's size, checksum, row count and
       columns are as the manifest recorded them.
    2. Drift: a sample of rows is re-scored with the computation `dadpo train` uses (HF, the
       training --dtype) and compared with the cached log-probs:
         reference  ref_logp_*      under --model (default: the cache's reference), on the
                                    cached reference token ids
         teacher    teacher_logp_*  under each of the cache's teachers (with --teacher),
                                    re-tokenized by the tokenization rule; token counts must match
       One line per column group: mean, p95 and max of |delta| per sequence and per token.
    A cache scored by vLLM or in bfloat16 drifts by rounding; a large drift means the cache
    does not describe the model you train against. Exit 0 unless --max-drift is exceeded (1).
    Example:
      dadpo verify-cache --cache cache/ --sample 128 --teacher --max-drift 0.05
    """
    from dadpo.errors import DadpoError
    from dadpo.verify import describe, verify_cache, worst_drift

    if cache_arg and cache and cache_arg != cache:
        raise DadpoError(f"verify-cache: two caches given ({cache_arg} and --cache {cache}); give one")
    path = cache or cache_arg
    if not path:
        raise click.UsageError("give the cache folder: dadpo verify-cache --cache DIR")
    if max_drift is not None and not max_drift >= 0:
        raise DadpoError(f"--max-drift {max_drift}: must be a number >= 0")
    result = verify_cache(build_config(VerifyConfig, flags, cache=path))
    click.echo(f"cache {path}: complete, {result['shards']} shards verified, {result['rows']} pairs, "
               f"{result['dropped']} dropped by the length rule")
    groups = [("reference", "ref_logp_*", result["reference"])] + [
        (f"teacher {name}".strip(), f"{'teacher_' + name if name else 'teacher'}_logp_*", stats)
        for name, stats in (result.get("teachers") or {}).items()]
    for group, columns, stats in groups:
        if stats:
            click.echo(f"{group} {columns} (cached: {stats['cached_with']}) vs {stats['model']} "
                       f"[{stats['dtype']}, {stats['device']}], {stats['pairs']} pairs: {describe(stats)}")
    worst = worst_drift(result)
    if max_drift is not None and worst and worst[1] > max_drift:
        click.echo(f"error: {worst[0]} drift {worst[1]:.3g} nats per sequence (max) exceeds --max-drift {max_drift}",
                   err=True)
        sys.exit(1)
