"""dadpo cache-teacher"""

from __future__ import annotations

import click

from dadpo.cli.main import cli
from dadpo.cli.options import parse_key_values


@cli.command("cache-teacher")
@click.option("--pairs", required=True, help="Pairs file: .parquet, .jsonl, .json or a datasets.save_to_disk folder "
              "with prompt, chosen (teacher response), rejected (student response) [, id]. See data_specs/pairs.v1.md.")
@click.option("--teacher", required=True, help="Teacher model: HF hub id or local folder.")
@click.option("--reference", required=True, help="Reference model (the dSFT student): HF hub id or local folder.")
@click.option("--out", required=True, help="Cache folder to create or resume.")
@click.option("--backend", default="auto", show_default=True, help="auto (vllm when installed, else hf), hf or vllm.")
@click.option("--dtype", default="auto", show_default=True, help="auto (the config's dtype), float32, bfloat16 or float16.")
@click.option("--teacher-revision", default=None, help="Hub revision (branch, tag or commit) of the teacher.")
@click.option("--reference-revision", default=None, help="Hub revision of the reference.")
@click.option("--max-length", type=int, default=None,
              help="Max prompt+response tokens, checked under both the teacher's and the reference's tokenizer; a pair over it on either side is dropped whole (never truncated). [default: the models' limit]")
@click.option("--on-overlong", default="drop", show_default=True,
              help="drop: skip over-long pairs (ids in CACHE/dropped_ids.txt); error: stop at the first one.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass (hf backend).")
@click.option("--shard-size", type=int, default=1000, show_default=True,
              help="Pairs per shard: the unit of progress kept across crashes.")
@click.option("--num-workers", type=int, default=1, show_default=True,
              help="Split the work over N independent processes (one per GPU, SLURM array, ...).")
@click.option("--worker-index", type=int, default=0, show_default=True, help="This process's index in 0..N-1.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache in --out and start over (one worker only: "
              "run it before launching the others).")
@click.option("--no-chat-template", is_flag=True, help="Plain mode: ignore the models' chat templates.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder/hub to run.")
@click.option("--device", default=None, help="hf backend device (default: cuda if available, else cpu).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vllm: GPUs per model.")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vllm: fraction of device memory to use.")
@click.option("--max-model-len", type=int, default=None, help="vllm: context length (default: --max-length + 1).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="vllm: tokens per engine step.")
@click.option("--fp32-head", is_flag=True, help="vllm: run the lm_head in float32 (less drift from HF in bf16).")
@click.option("--seed", type=int, default=0, show_default=True, help="vllm: engine seed.")
@click.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE",
              help="vllm: any other vllm.LLM argument; repeatable. VALUE is parsed as JSON when it can be.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cache_teacher_command(**flags):
    """Score every pair under the teacher and the reference, once, into Parquet shards.

    \b
    The two models are scored in separate passes (never both in memory). Progress is kept
    per shard: re-running the same command after a crash (even kill -9) continues where it
    stopped. Re-running into a cache made with other settings (models, weights, tokenizer,
    dtype, length rule, pairs) stops and names each difference; --overwrite starts over.
    N processes (GPUs, nodes, a SLURM array) fill one folder with --num-workers N --worker-index I.
    Example:
      dadpo cache-teacher --pairs pairs.jsonl --teacher Qwen/Qwen2.5-7B-Instruct \\
          --reference ./sft-1.5b --out cache/ --dtype bfloat16 --max-length 2048
    """
    from dadpo.cache_teacher import CacheTeacherConfig, cache_teacher
    from dadpo.scoring.base import EngineOptions

    engine = EngineOptions(
        batch_size=flags.pop("batch_size"), device=flags.pop("device"),
        tensor_parallel_size=flags.pop("tensor_parallel_size"),
        gpu_memory_utilization=flags.pop("gpu_memory_utilization"), max_model_len=flags.pop("max_model_len"),
        max_num_batched_tokens=flags.pop("max_num_batched_tokens"), fp32_head=flags.pop("fp32_head"),
        seed=flags.pop("seed"), extra=parse_key_values(flags.pop("vllm_args"), "--vllm-arg"),
    )
    quiet = flags.pop("quiet")
    summary = cache_teacher(CacheTeacherConfig(**flags, engine=engine, progress=not quiet))
    state = "complete" if summary.complete else f"{summary.shards_done} of {summary.num_shards} shards done"
    dropped = f" (ids in {summary.path}/dropped_ids.txt)" if summary.dropped else ""
    click.echo(f"cache {summary.path}: {summary.rows} pairs cached, {summary.dropped} dropped by the length rule"
               f"{dropped}, {state} ({summary.seconds:.1f} s)")
    if summary.adopted or summary.repaired:
        click.echo(f"  resumed: {summary.adopted} shard(s) found whole on disk and recorded, "
                   f"{summary.repaired} altered or missing shard(s) recomputed")
    for role, stats in summary.pass_stats.items():
        click.echo(f"  {role}: {stats['tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:.0f} tok/s)")
    if not summary.complete:
        click.echo("  other workers' shards are still missing; training waits for a complete cache")

