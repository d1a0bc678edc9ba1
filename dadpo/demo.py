"""`dadpo demo`: the whole pipeline on tiny local models, through the same calls as the CLI.

Builds a tiny reasoning teacher (Llama, byte-level BPE, a ChatML template whose generation prompt
opens <think> as DeepSeek-R1 distills do) and a tiny student (Qwen3, Metaspace BPE, zephyr-style
template) with different tokenizers, writes synthetic pairs whose teacher responses carry
reasoning, caches the teacher and reference log-probs, trains the student from the cache, and
ends with `dadpo eval --judge answer` on held-out prompts of the same task: the student before
training (the reference) and after daDPO, against the teacher. Needs no network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from dadpo.atomic import write_atomic
from dadpo.cache import cache_teacher
from dadpo.config import CacheTeacherConfig, EvalConfig, TrainConfig
from dadpo.engine import EngineOptions
from dadpo.eval.report import render_table
from dadpo.eval.run import evaluate
from dadpo.recipes.dadpo import train
from dadpo.tiny import build_demo_models, make_tiny_pairs, make_tiny_prompts


def run_demo(workdir: str | Path, backend: str = "auto", num_pairs: int = 96, say: Callable[[str], None] = print,
             progress: bool = False, num_prompts: int = 24) -> dict:
    workdir = Path(workdir)
    started = time.monotonic()
    teacher_dir, student_dir = build_demo_models(workdir / "models")
    say(f"1. built tiny models in {workdir / 'models'}: a reasoning teacher (Llama; its chat template opens <think> "
        "in the generation prompt and strips reasoning from earlier turns) and a student (Qwen3, zephyr-style "
        "template), each with its own tokenizer")

    pairs_file = workdir / "pairs.jsonl"
    lines = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in make_tiny_pairs(num_pairs, 0, reasoning=True))
    write_atomic(pairs_file, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    say(f"2. wrote {num_pairs} synthetic pairs (prompt, chosen = the teacher's reasoning and answer, rejected = the "
        f"student's answer) to {pairs_file}")

    cache_dir = workdir / "cache"
    summary = cache_teacher(CacheTeacherConfig(
        pairs=str(pairs_file), teacher=[str(teacher_dir)], reference=str(student_dir), out=str(cache_dir),
        backend=backend, dtype="float32", shard_size=32, max_length=256, overwrite=True,
        # eager vLLM: a tiny model gains nothing from graph compilation, which costs ~30 s a start on CPU
        engine=EngineOptions(batch_size=16, extra={"enforce_eager": True}), progress=progress,
    ))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    rates = ", ".join(f"{role} {stats['tokens_per_s']:.0f} tok/s" for role, stats in summary.pass_stats.items())
    say(f"3. cache-teacher [{manifest['reference']['backend']}]: {summary.rows} pairs scored under teacher and "
        f"reference into {summary.num_shards} shards ({summary.dropped} dropped as over-long; {rates}); each response "
        "scored as its own tokens after the model's generation prompt (tokenization rule 2)")

    run_dir = workdir / "run"
    result = train(TrainConfig(
        cache=str(cache_dir), out=str(run_dir), beta1=0.1, beta2=0.01, lr=2e-4, batch_size=8, grad_accum=1,
        epochs=3, warmup_steps=2, eval_fraction=0.1, progress=progress,
    ))
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    say(f"4. train (beta1=0.1, beta2=0.01): {len(steps)} steps, loss {steps[0]['loss']:.4f} -> "
        f"{steps[-1]['loss']:.4f}, reward accuracy {steps[0]['reward_accuracy']:.2f} -> "
        f"{steps[-1]['reward_accuracy']:.2f}, eval loss {result['eval'].get('eval_loss', float('nan')):.4f}")
    say(f"5. student checkpoint: {result['model_dir']} (AutoModelForCausalLM.from_pretrained loads it); "
        f"metrics: {run_dir / 'metrics.jsonl'}")

    prompts_file = workdir / "heldout.jsonl"
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in make_tiny_prompts(num_prompts, seed=1))
    write_atomic(prompts_file, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    eval_dir = workdir / "eval"
    eval_lines: list[str] = []  # evaluate's own lines; the demo prints the table once, below
    summary_eval = evaluate(EvalConfig(
        prompts=str(prompts_file), baseline=f"teacher={teacher_dir}", out=str(eval_dir), judge="answer",
        model=[f"reference={student_dir}", f"dadpo={result['model_dir']}"],
        # in-process HF: a few dozen short greedy answers of tiny models take less than one vLLM engine start
        backend="hf", dtype="float32", max_new_tokens=32, temperature=0.0, overwrite=True, progress=progress,
    ), say=eval_lines.append)
    say(f"6. eval --judge answer: {num_prompts} held-out prompts of the same task ({prompts_file}), greedy, "
        "the student before training (reference) and after daDPO (dadpo) against the teacher. The tiny models "
        "have random weights, so accuracy near 0% is the expected, honest result; with real models this table "
        "answers whether the student got better.")
    say(render_table(summary_eval).rstrip("\n"))
    say(f"eval folder: {eval_dir} (summary.json, summary.md, judgments.parquet, responses/). "
        f"Done in {time.monotonic() - started:.0f} s.")
    return {"cache": summary, "train": result, "steps": steps, "eval": summary_eval}
