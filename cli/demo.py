"""dadpo demo"""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--workdir", default="dadpo-demo", show_default=True,
              help="Folder for the models, pairs, cache, run and eval.")
@click.option("--backend", default="auto", show_default=True, help="Scoring backend: auto, hf or vllm.")
@click.option("--pairs", "num_pairs", type=int, default=96, show_default=True, help="Synthetic pairs to make.")
@click.option("--progress", is_flag=True, help="Show progress bars.")
def demo_command(workdir, backend, num_pairs, progress):
    """Run the whole pipeline on tiny local models (no network, a few minutes on a laptop CPU).

    Builds a tiny teacher and student with different tokenizers and chat templates, makes
    synthetic pairs, runs cache-teacher, train and eval (answer match on held-out prompts: the
    student before and after daDPO against the teacher) exactly as the commands do, and says what
    happened.
    """
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's few lines, not vLLM's warnings
    from dadpo.demo import run_demo

    run_demo(workdir, backend=backend, num_pairs=num_pairs, say=click.echo, progress=progress)
