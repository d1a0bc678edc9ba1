"""dadpo inspect"""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("cache")
@click.option("--png", default=None, help="Also draw histograms of h_te, h_ref and d_te into this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object instead of text.")
@click.option("--beta2", type=float, default=None,
              help="Also say how big the teacher term |beta2*(h_ref - h_te)| is for this beta2, and step 0's loss.")
def inspect_command(cache, png, as_json, beta2):
    """Summarise a cache: pairs, tokens, dropped pairs and the margin distributions.

    \b
    h_te  = log teacher(chosen) - log teacher(rejected)
    h_ref = log reference(chosen) - log reference(rejected)
    d_te  = h_te - h_ref  (how much more the teacher prefers its response than the reference does)
    Every shard's checksum is verified while reading.
    The teacher term at the start of training is beta2*(h_ref - h_te); the report gives the beta2
    that keeps it near 1 for the median pair (--beta2 B: its size and step 0's loss for B).
    Example:
      dadpo inspect cache/ --png cache-margins.png
      dadpo inspect cache/ --beta2 0.1
    """
    from dataclasses import asdict

    from dadpo.inspect_cache import format_report, inspect_cache, plot_histograms

    report = inspect_cache(cache, beta2)
    if png:
        plot_histograms(report, png)
    if as_json:
        payload = {k: v for k, v in asdict(report).items() if k != "values"}
        payload["margins"] = {name: {**d, "quantiles": {str(q): v for q, v in d["quantiles"].items()}}
                              for name, d in payload["margins"].items()}
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(format_report(report))
    if png:
        click.echo(f"histograms written to {png}", err=as_json)
