"""dadpo generate"""

from __future__ import annotations

import click

from dadpo.cli.main import cli
from dadpo.cli.options import parse_key_values


@cli.command("generate")
@click.option("--prompts", required=True, help="Prompts file: .parquet, .jsonl, .json or a datasets.save_to_disk folder "
              "with `prompt` (a string or a list of {role, content} messages) [, id]. Other columns travel through "
              "(chosen/rejected, if present, are ignored).")
@click.option("--teacher", required=True, help="Teacher model: HF hub id or local folder.")
@click.option("--student", required=True, help="Student model (the one whose responses become `rejected`).")
@click.option("--out", required=True, help="Pairs file to write (.parquet or .jsonl); OUT.work/ holds the progress.")
@click.option("--backend", default="auto", show_default=True, help="auto (vllm when installed, else hf), hf or vllm.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Longest response, in tokens.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sampling seed; the same seed and settings give the same pairs, interrupted or not.")
@click.option("--dtype", default="auto", show_default=True, help="auto (the config's dtype), float32, bfloat16 or float16.")
@click.option("--teacher-revision", default=None, help="Hub revision (branch, tag or commit) of the teacher.")
@click.option("--student-revision", default=None, help="Hub revision of the student.")
@click.option("--chunk-size", type=int, default=512, show_default=True,
              help="Prompts per chunk: the unit of progress kept across crashes.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="hf: prompts per model.generate call.")
@click.option("--device", default=None, help="hf backend device (default: cuda if available, else cpu).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vllm: GPUs per model.")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vllm: fraction of device memory to use.")
@click.option("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's).")
@click.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE",
              help="vllm: any other vllm.LLM argument; repeatable. VALUE is parsed as JSON when it can be.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (and its unfinished work) and start over.")
@click.option("--no-chat-template", is_flag=True, help="Plain mode: ignore the models' chat templates.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder/hub to run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate_command(**flags):
    """Sample one teacher and one student response per prompt into a pairs file.

    \b
    Each model sees the prompt through its own chat template (the same rendering that
    cache-teacher and train use) and stops at its end-of-turn token. The output follows the
    pairs spec (id, prompt, chosen = teacher response, rejected = student response, in TRL's
    conversational format) plus teacher_/student_finish_reason ("stop" or "length" when cut at
    --max-new-tokens); pairs with an empty response are left out and listed in OUT.generate.json,
    which, like the Parquet metadata, records the sampling settings and models.
    The two models run one after the other, never both in memory. Re-running the same command
    after a crash continues from the last finished chunk.
    Example:
      dadpo generate --prompts prompts.jsonl --teacher Qwen/Qwen2.5-7B-Instruct \\
          --student ./pruned-student --out pairs.parquet --temperature 0.7 --max-new-tokens 1024
    """
    from dadpo.generate import GenerateConfig, Sampling, generate_pairs
    from dadpo.scoring.base import EngineOptions

    sampling = Sampling(max_new_tokens=flags.pop("max_new_tokens"), temperature=flags.pop("temperature"),
                        top_p=flags.pop("top_p"), seed=flags.pop("seed"))
    engine = EngineOptions(batch_size=flags.pop("batch_size"), device=flags.pop("device"),
                           tensor_parallel_size=flags.pop("tensor_parallel_size"),
                           gpu_memory_utilization=flags.pop("gpu_memory_utilization"),
                           max_model_len=flags.pop("max_model_len"), seed=sampling.seed,
                           extra=parse_key_values(flags.pop("vllm_args"), "--vllm-arg"))
    quiet = flags.pop("quiet")
    summary = generate_pairs(GenerateConfig(**flags, sampling=sampling, engine=engine, progress=not quiet))
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
