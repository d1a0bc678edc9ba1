"""dadpo sweep"""

from __future__ import annotations

import click

from dadpo.cli.options import build_config, config_options
from dadpo.config import TrainConfig


@click.command("sweep")
@click.option("--beta1", "beta1s", default="0.01,0.1,1", show_default=True,
              help="Comma-separated beta1 values (reference term; 0 = rDPO).")
@click.option("--beta2", "beta2s", default="0.001,0.01,0.1,1", show_default=True,
              help="Comma-separated beta2 values (teacher term; 0 = dDPO).")
@config_options(TrainConfig, exclude=("beta1", "beta2", "resume"),  # interrupted points are resumed by themselves
                overrides={"out": {"help": "Sweep folder: one run folder per point, summary.csv/.md/.png."}})
def sweep_command(beta1s, beta2s, **flags):
    """Train a (beta1, beta2) grid from one cache: the teacher and reference are never loaded.

    \b
    Every `dadpo train` flag applies to every point. Points already finished are skipped and
    interrupted ones resumed (from their checkpoints, with --save-every) when re-run; a point left
    half written is trained again. The summary (csv, markdown table, heatmap PNG of eval loss /
    reward accuracy / margin) is rewritten each time. beta2 = 0 points are the dDPO baseline,
    beta1 = 0 points rDPO. The paper's 3 x 4 grid (the defaults):
      dadpo sweep --cache cache/ --model ./sft-1.5b --out runs/ --lr 5e-7
    """
    from dadpo.sweep import parse_betas, run_sweep

    run_sweep(build_config(TrainConfig, flags), parse_betas(beta1s, "--beta1"), parse_betas(beta2s, "--beta2"),
              say=_say)


def _say(line: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(line)
