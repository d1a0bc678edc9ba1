"""dadpo report"""

from __future__ import annotations

import click


@click.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="report.png", show_default=True, help="PNG to write.")
@click.option("--smooth", type=int, default=1, show_default=True, help="Moving average over N steps.")
def report_command(runs, out, smooth):
    """Plot loss, margin and reward-accuracy curves of RUNS (overlaid) to a PNG.

    \b
    RUNS are run folders (dadpo train --out) or sweep folders (dadpo sweep --out), whose runs
    are all drawn. Eval points from RUN/eval.jsonl are drawn as markers.
      dadpo report runs/ --out sweep.png
      dadpo report runs/b1=0.1_b2=0.01 runs/b1=0.1_b2=0 --out daDPO-vs-dDPO.png --smooth 10
    """
    from dadpo.report import plot_runs

    path, drawn = plot_runs(list(runs), out, smooth=smooth)
    click.echo(f"wrote {path}: {len(drawn)} run(s): {', '.join(p.name for p in drawn)}")
