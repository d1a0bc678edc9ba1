"""dadpo inspect"""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("cache")
@click.option("--png", default=None, help="Also draw histograms of h_te, h_ref and d_te into this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object instead of text.")
def inspect_command(cache, png, as_json):
    """Summarise a cache: pairs, tokens, dropped pairs and the margin distributions.

    \b
    h_te  = log teacher(chosen) - log teacher(rejected)
    h_ref = log reference(chosen) - log reference(rejected)
    d_te  = h_te - h_ref  (how much more the teacher prefers its response than the reference does)
    Every shard's checksum is verified while reading.
    Example:
      dadpo inspect cache/ --png cache-margins.png
    """
    from dataclasses import asdict

    from dadpo.inspect_cache import format_report, inspect_cache, plot_histograms

    report = inspect_cache(cache)
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
