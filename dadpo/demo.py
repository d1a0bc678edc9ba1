"""`dadpo demo`: the whole pipeline on tiny local models, through the same calls as the CLI.

Builds a tiny teacher (Llama, byte-level BPE, ChatML) and a tiny student (Qwen3, Metaspace BPE,
zephyr-style template) with different tokenizers, writes synthetic pairs, caches the teacher
and reference log-probs, and trains the student from the cache. Needs no network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from dadpo.cache_teacher import CacheTeacherConfig, cache_teacher
from dadpo.scoring.base import EngineOptions
from dadpo.tiny import build_demo_models, make_tiny_pairs
from dadpo.train import TrainConfig, train


def run_demo(workdir: str | Path, backend: str = "auto", num_pairs: int = 96, say: Callable[[str], None] = print,
             progress: bool = False) -> dict:
    workdir = Path(workdir)
    started = time.time()
    teacher_dir, student_dir = build_demo_models(workdir / "models")
    say(f"1. built tiny models in {workdir / 'models'}: teacher (Llama, ChatML template) and student "
        "(Qwen3, zephyr-style template), each with its own tokenizer")

    pairs_file = workdir / "pairs.jsonl"
    with open(pairs_file, "w", encoding="utf-8") as handle:
        for pair in make_tiny_pairs(num_pairs, seed=0):
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    say(f"2. wrote {num_pairs} synthetic pairs (prompt, chosen = teacher answer, rejected = student answer) "
        f"to {pairs_file}")

    cache_dir = workdir / "cache"
    summary = cache_teacher(CacheTeacherConfig(
        pairs=str(pairs_file), teacher=str(teacher_dir), reference=str(student_dir), out=str(cache_dir),
        backend=backend, dtype="float32", shard_size=32, max_length=256, overwrite=True,
        # eager vLLM: a tiny model gains nothing from graph compilation, which costs ~30 s a start on CPU
        engine=EngineOptions(batch_size=16, extra={"enforce_eager": True}), progress=progress,
    ))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    rates = ", ".join(f"{role} {stats['tokens_per_s']:.0f} tok/s" for role, stats in summary.pass_stats.items())
    say(f"3. cache-teacher [{manifest['teacher']['backend']}]: {summary.rows} pairs scored under teacher and "
        f"reference into {summary.num_shards} shards ({summary.dropped} dropped as over-long; {rates})")

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
        f"metrics: {run_dir / 'metrics.jsonl'}. Done in {time.time() - started:.0f} s.")
    return {"cache": summary, "train": result, "steps": steps}
