"""Micro-scale replication of daDPO's pruned-student experiment (arXiv 2506.15717), in one command.

    python benchmarks/replicate/run.py --out /tmp/replicate                  # the full run (< 30 min, 2 CPU cores)
    python benchmarks/replicate/run.py --out /tmp/replicate-q --quick        # wiring check (~2 min)
    python benchmarks/replicate/run.py --out /tmp/r --set dpo_lr=3e-5 ...    # any setting of FULL

Every model step goes through dadpo's own library calls (the code behind the CLI commands):
  1. task: reverse or sort a lowercase string of 3-10 letters, one user turn in a chat template
     (task.py, character-level tokenizer); answers are checked by dadpo's answer match.
  2. teacher: a small Llama-architecture model trained from scratch on ground truth (`dadpo sft`).
  3. students: the teacher structurally pruned by 20% and 50% of its non-embedding weights
     (attention heads + MLP neurons, prune.py), then a brief recovery fine-tune (`dadpo sft`).
  4. per pruning level and seed, in worker processes:
       dadpo generate       teacher (chosen) and student responses to the distillation prompts
       dadpo sft            dSFT of the student on the teacher's responses -> the reference
       dadpo generate       again with the dSFT student (on-policy rejects; rejected_from="dsft")
       dadpo cache-teacher  teacher and reference log-probs, once (ties, chosen == rejected, left out)
       dadpo sweep          beta1 x beta2 grid: dDPO (beta2 = 0), rDPO (beta1 = 0), daDPO (both > 0)
  5. evaluation: `dadpo eval --judge answer` (dadpo.eval.run.evaluate) on held-out prompts, greedy,
     baseline = the teacher, one --model per student (pruned + recovery, dSFT, every sweep point):
     exact accuracy, and eval's win rate against the teacher = (win + tie/2) / prompts with its
     bootstrap 95% interval (win: only the student right, loss: only the teacher; 0.5 = on par).
  6. OUT/results.json and OUT/RESULTS.md (mean +- sd over seeds, the paper's claims checked);
     --write-results also writes them next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402
from prune import prune  # noqa: E402

FULL = dict(
    min_len=3, max_len=10,  # letters per string
    teacher=dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256),
    teacher_examples=8000, teacher_steps=2000, teacher_batch=64, teacher_lr=3e-3,
    recovery_steps=10, recovery_lr=1e-3,
    distill_prompts=2048, test_prompts=1000, seeds=[0, 1, 2, 3, 4], levels=[0.2, 0.5],
    temperature=0.7, max_new_tokens=12, rejected_from="dsft",
    sft_epochs=2, sft_batch=32, sft_lr=1e-3,
    dpo_epochs=2, dpo_batch=32, dpo_lr=1e-4, beta1s=[0.0, 0.1, 1.0], beta2s=[0.0, 0.01, 0.1, 1.0],
)
QUICK = dict(FULL, teacher_examples=1500, teacher_steps=150, recovery_steps=5, distill_prompts=128, test_prompts=100,
             seeds=[0], sft_epochs=1, dpo_epochs=1, beta1s=[0.0, 0.1], beta2s=[0.0, 0.1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def replication_parser(description: str, quick: str, set_example: str, results: str) -> argparse.ArgumentParser:
    """The flags of run.py and real.py: --out, --quick (help: quick), --workers, --set (its example:
    set_example), --write-results (what it writes: results)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Work folder (models, pairs, caches, runs, results).")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workers", type=int, default=2,
                        help="(level, seed) jobs run in this many processes, one CPU thread each.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help=f"Override a setting (see FULL), e.g. {set_example}; recorded in results.json.")
    parser.add_argument("--write-results", action="store_true", help=f"Also write {results}.")
    return parser


def main() -> None:
    parser = replication_parser(__doc__, "Tiny settings, one seed: checks the wiring.",
                                "--set dpo_lr=1e-4 --set seeds=[0,1]",
                                "benchmarks/replicate/RESULTS.md and results.json (the full run's record)")
    parser.add_argument("--reuse-teacher", default=None,
                        help="Development only: take the teacher from an earlier --out instead of training it.")
    args = parser.parse_args()
    settings = chosen_settings(parser, args, QUICK if args.quick else FULL)
    out = fresh_folder(Path(args.out))
    started = time.time()
    timings: dict[str, float] = {}
    single_thread()

    data = write_data(out / "data", settings)
    with timed(timings, "teacher"):
        if args.reuse_teacher:
            teacher = Path(args.reuse_teacher) / "teacher" / "model"
        else:
            teacher = train_teacher(out, data, settings)
    from dadpo.tokenization import RULE_VERSION

    results = {"settings": settings, "teacher": {}, "students": {}, "runs": [], "workers": args.workers,
               "reused_teacher": bool(args.reuse_teacher), "tokenization_rule": RULE_VERSION,
               "command": "python benchmarks/replicate/run.py " + " ".join(sys.argv[1:]), "overrides": args.overrides}
    students, prunings = {}, {}
    for level in settings["levels"]:
        with timed(timings, "prune + recovery"):
            students[level], prunings[level] = make_student(out, teacher, data, level, settings)
    with timed(timings, "evaluate"):
        summary = evaluate(out / "eval", teacher, {student_name(level): students[level] for level in students},
                           data["test_file"], len(data["test"]))
    results["teacher"]["accuracy"] = summary["baseline_accuracy"]
    log(f"teacher greedy accuracy {summary['baseline_accuracy']:.3f} on {len(data['test'])} held-out prompts")
    for level, pruning in prunings.items():
        row = judged(summary, student_name(level))
        log(f"pruned {level:.0%}: {pruning['removed']:.1%} of the non-embedding weights removed "
            f"({pruning['heads']} of {pruning['teacher_heads']} heads, MLP {pruning['intermediate_size']} of "
            f"{pruning['teacher_intermediate_size']} neurons per layer), "
            f"accuracy after recovery {row['accuracy']:.3f}")
        results["students"][str(level)] = {**pruning, **row}

    distill_all(out, teacher, students, data, settings, results, started, timings, args)


def distill_all(out: Path, teacher: Path, students: dict, data: dict, settings: dict, results: dict, started: float,
                timings: dict, args, names: tuple[str, str] = ("RESULTS.md", "results.json")) -> None:
    """`distill` for every (level, seed) into results["runs"]; the results written after each job."""
    # Each (level, seed) is independent: spread them over worker processes, one CPU thread each
    # (on a shared machine, single-threaded processes degrade far less than one 2-thread one).
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = [(level, seed) for seed in settings["seeds"] for level in settings["levels"]]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=single_thread) as pool:
        futures = [pool.submit(distill, out / f"p{int(level * 100)}" / f"seed{seed}", teacher, students[level], data,
                               level, seed, settings) for level, seed in jobs]
        for future in as_completed(futures):
            rows, job_timings = future.result()
            results["runs"] += rows
            for name, seconds in job_timings.items():
                timings[f"{name} (summed over workers)"] = timings.get(f"{name} (summed over workers)", 0) + seconds
            write_results(out, results, started, timings, args, names=names)
    results["runs"].sort(key=lambda r: (r["level"], r["seed"]))
    write_results(out, results, started, timings, args, final=True, names=names)


def chosen_settings(parser: argparse.ArgumentParser, args, base: dict) -> dict:
    """`base` with each --set KEY=JSON applied (an unknown key is a usage error)."""
    settings = dict(base)
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in settings:
            parser.error(f"--set {item}: unknown setting {key!r} (known: {', '.join(settings)})")
        settings[key] = json.loads(value)
    return settings


def fresh_folder(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)  # every run from scratch: the wall time is the whole experiment's
    out.mkdir(parents=True)
    return out


def single_thread() -> None:
    """One intra-op thread: with two cores shared by several processes, OpenMP's spinning threads
    make a 2-thread step up to 10x slower than a 1-thread one."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)


class timed:
    """Add the time spent in a `with` block to timings[name]."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.time()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.time() - self.start


# ---------------------------------------------------------------- data


def write_data(folder: Path, settings: dict) -> dict:
    """Ground-truth pairs for the teacher, distillation prompts and test prompts: disjoint prompt sets."""
    import random

    folder.mkdir(parents=True)
    lengths = dict(min_len=settings["min_len"], max_len=settings["max_len"])
    test = task.make_split(settings["test_prompts"], seed=1000, **lengths)
    distill = task.make_split(settings["distill_prompts"], seed=2000, exclude={r["prompt"] for r in test}, **lengths)
    truth = task.make_split(settings["teacher_examples"], seed=3000, exclude={r["prompt"] for r in test + distill},
                            **lengths)
    rng = random.Random(0)
    write_jsonl(folder / "ground_truth_pairs.jsonl",
                [{"id": r["id"], "prompt": r["prompt"], "chosen": r["answer"], "rejected": task.wrong_answer(rng, r)}
                 for r in truth])
    write_jsonl(folder / "distill_prompts.jsonl",
                [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in distill])
    write_jsonl(folder / "test.jsonl", test)
    return {"ground_truth": folder / "ground_truth_pairs.jsonl", "distill_prompts": folder / "distill_prompts.jsonl",
            "test": test, "test_file": folder / "test.jsonl"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- models


def train_teacher(out: Path, data: dict, settings: dict) -> Path:
    """A random-init Llama with the character tokenizer, fine-tuned on ground truth with dadpo sft."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from dadpo.config import SftConfig
    from dadpo.recipes.sft import sft

    init = out / "teacher-init"
    tokenizer = task.build_tokenizer(init)
    shape = settings["teacher"]
    # Llama architecture; MistralConfig (sliding window off) because LlamaConfig would refuse the
    # pruned students' head counts (see prune.py).
    config = MistralConfig(sliding_window=None, vocab_size=len(tokenizer), hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_heads"],
                         head_dim=shape["hidden_size"] // shape["num_heads"], max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(init)
    log(f"training the teacher ({settings['teacher_steps']} steps of {settings['teacher_batch']} examples)")
    summary = sft(SftConfig(pairs=str(data["ground_truth"]), model=str(init), out=str(out / "teacher"),
                            lr=settings["teacher_lr"], batch_size=settings["teacher_batch"], grad_accum=1,
                            max_steps=settings["teacher_steps"], warmup_steps=30, lr_schedule="cosine",
                            eval_fraction=0.0, seed=0, progress=False))
    log(f"teacher: final loss {summary['final_train']['loss']:.4f} per token")
    return Path(summary["model_dir"])


def make_student(out: Path, teacher: Path, data: dict, level: float, settings: dict) -> tuple[Path, dict]:
    """Prune the teacher by `level`, then a brief recovery fine-tune on ground truth."""
    from dadpo.config import SftConfig
    from dadpo.recipes.sft import sft

    pruned = out / f"p{int(level * 100)}" / "pruned"
    pruning = prune(teacher, pruned, level)
    summary = sft(SftConfig(pairs=str(data["ground_truth"]), model=str(pruned),
                            out=str(out / f"p{int(level * 100)}" / "recovered"), lr=settings["recovery_lr"],
                            batch_size=settings["teacher_batch"], grad_accum=1, max_steps=settings["recovery_steps"],
                            eval_fraction=0.0, seed=0, progress=False))
    return Path(summary["model_dir"]), pruning


# ---------------------------------------------------------------- one (pruning level, seed)


def distill(folder: Path, teacher: Path, student: Path, data: dict, level: float, seed: int,
            settings: dict) -> tuple[list[dict], dict]:
    """One (pruning level, seed): generate -> dSFT -> cache-teacher -> sweep -> evaluate; (rows, timings)."""
    from dadpo.cache import cache_teacher
    from dadpo.config import CacheTeacherConfig, GenerateConfig, Sampling, SftConfig, TrainConfig
    from dadpo.engine import EngineOptions
    from dadpo.generate import generate_pairs
    from dadpo.recipes.sft import sft
    from dadpo.sweep import run_sweep

    tag = f"pruned {level:.0%} seed {seed}"
    timings: dict[str, float] = {}
    pairs = folder / "pairs.parquet"
    with timed(timings, "generate"):
        summary = generate_pairs(GenerateConfig(
            prompts=str(data["distill_prompts"]), teacher=str(teacher), student=str(student), out=str(pairs),
            backend="hf", sampling=Sampling(max_new_tokens=settings["max_new_tokens"],
                                            temperature=settings["temperature"], seed=seed),
            engine=EngineOptions(batch_size=128), progress=False))
    pair_stats = pair_statistics(pairs, "pruned student", len(summary.dropped))
    log(f"{tag}: generated {summary.rows} pairs; teacher responses correct {pair_stats['teacher_correct']:.3f}, "
        f"student {pair_stats['student_correct']:.3f}, identical {pair_stats['identical']:.3f}")
    with timed(timings, "dSFT"):
        sft_summary = sft(SftConfig(pairs=str(pairs), model=str(student), out=str(folder / "sft"),
                                    lr=settings["sft_lr"], batch_size=settings["sft_batch"], grad_accum=1,
                                    epochs=settings["sft_epochs"], eval_fraction=0.0, seed=seed, progress=False))
    reference = Path(sft_summary["model_dir"])
    if settings["rejected_from"] == "dsft":
        # On-policy rejects: the responses of the model DPO starts from (the teacher's are the same
        # as above: same seed, same chunks).
        with timed(timings, "generate"):
            summary = generate_pairs(GenerateConfig(
                prompts=str(data["distill_prompts"]), teacher=str(teacher), student=str(reference),
                out=str(folder / "pairs_dsft.parquet"), backend="hf",
                sampling=Sampling(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                  seed=seed), engine=EngineOptions(batch_size=128), progress=False))
        pairs = folder / "pairs_dsft.parquet"
        # the pairs DPO learns from: their rejected side is the dSFT student's
        pair_stats = pair_statistics(pairs, "dSFT student", len(summary.dropped))
        log(f"{tag}: dSFT student responses correct {pair_stats['student_correct']:.3f}")
    # A pair whose two responses are the same string states no preference (every model's margin
    # is exactly 0, so it has no gradient); with exact answers many are ties. Cache only the rest.
    preference_pairs = folder / "preference_pairs.parquet"
    drop_ties(pairs, preference_pairs)
    with timed(timings, "cache-teacher"):
        cache_teacher(CacheTeacherConfig(pairs=str(preference_pairs), teacher=str(teacher), reference=str(reference),
                                         out=str(folder / "cache"), backend="hf", dtype="float32",
                                         engine=EngineOptions(batch_size=128), progress=False))
    from dadpo.inspect_cache import inspect_cache

    # how big the teacher term starts (what `dadpo inspect --beta2` reports): median |h_ref - h_te|
    report = inspect_cache(folder / "cache")
    pair_stats.update(preference_pairs=report.rows, median_gap=report.teacher_terms[""].median_gap)
    with timed(timings, "train (sweep)"):
        run_sweep(TrainConfig(cache=str(folder / "cache"), out=str(folder / "runs"), lr=settings["dpo_lr"],
                              batch_size=settings["dpo_batch"], grad_accum=1, epochs=settings["dpo_epochs"],
                              eval_fraction=0.0, seed=seed, progress=False),
                  settings["beta1s"], settings["beta2s"], say=lambda line: None)
    from dadpo.eval.responses import sweep_points

    # One eval per (level, seed): the teacher's responses against dSFT's and every sweep point's
    # (the sweep folder expands to its points, named b1=X_b2=Y).
    with timed(timings, "evaluate"):
        summary = evaluate(folder / "eval", teacher, {"dSFT": reference, "sweep": folder / "runs"},
                           data["test_file"], len(data["test"]), settings.get("eval_max_new_tokens", 12))
    labels = {"dSFT": "dSFT"}
    labels.update({f"sweep-{point}": method_label(*betas) for point, _, betas in sweep_points(str(folder / "runs"))
                   if any(betas)})
    rows = [{"level": level, "seed": seed, "method": method, **judged(summary, name),
             "teacher_accuracy": summary["baseline_accuracy"], "pairs": pair_stats}
            for name, method in labels.items()]
    log(f"{tag}: " + ", ".join(f"{r['method']} {r['accuracy']:.3f}" for r in rows))
    return rows, timings


def method_label(beta1: float, beta2: float) -> str:
    name = "dDPO" if beta2 == 0 else "rDPO" if beta1 == 0 else "daDPO"
    return f"{name} (b1={beta1:g}, b2={beta2:g})"


def drop_ties(pairs: Path, out: Path) -> None:
    import polars as pl

    frame = pl.read_parquet(pairs)
    same = [c[0]["content"] == r[0]["content"] for c, r in zip(frame["chosen"].to_list(), frame["rejected"].to_list())]
    frame.filter(~pl.Series(same)).write_parquet(out)


def pair_statistics(pairs: Path, rejected_by: str, dropped: int) -> dict:
    """What the pairs file holds: its rows, the share of right answers on each side, the identical share;
    `rejected_by` names the model that wrote the rejected side, `dropped` the rows generate left out."""
    import polars as pl

    from dadpo.eval.answer import answers_match

    frame = pl.read_parquet(pairs)
    chosen = [m[0]["content"] for m in frame["chosen"].to_list()]
    rejected = [m[0]["content"] for m in frame["rejected"].to_list()]
    answers = frame["answer"].to_list()
    n = max(len(answers), 1)
    return {"rows": len(answers), "rejected_by": rejected_by, "dropped": dropped,
            "teacher_correct": sum(answers_match(c, a) for c, a in zip(chosen, answers)) / n,
            "student_correct": sum(answers_match(r, a) for r, a in zip(rejected, answers)) / n,
            "identical": sum(c == r for c, r in zip(chosen, rejected)) / n}


# ---------------------------------------------------------------- evaluation


def student_name(level: float) -> str:
    return f"pruned{int(level * 100)}+recovery"


def evaluate(out: Path, teacher: Path, models: dict[str, Path], test_file: Path, prompts: int,
             max_new_tokens: int = 12) -> dict:
    """`dadpo eval --judge answer` of `models` ({name: model or sweep folder}) against the teacher on the
    held-out prompts, greedy; the eval's summary (summary.json's content)."""
    from dadpo.config import EvalConfig
    from dadpo.engine import EngineOptions
    from dadpo.eval.run import evaluate as run_eval

    return run_eval(EvalConfig(prompts=str(test_file), baseline=f"teacher={teacher}",
                               model=[f"{name}={path}" for name, path in models.items()], out=str(out),
                               judge="answer", backend="hf", dtype="float32",
                               engine=EngineOptions(batch_size=prompts, device="cpu"),
                               max_new_tokens=max_new_tokens, temperature=0.0, seed=0, progress=False),
                    say=lambda line: None)


def judged(summary: dict, name: str) -> dict:
    """One model's row from an eval summary: accuracy, and eval's win rate against the teacher,
    (win + tie/2) / (win + tie + loss) in [0, 1] (0.5 = on par), with its bootstrap 95% interval;
    wins and losses as shares of the prompts."""
    stats = summary["models"][name]
    n = stats["win"] + stats["tie"] + stats["loss"]
    return {"accuracy": stats["accuracy"], "win_rate": stats["win_rate"], "ci95": stats["ci95"],
            "wins": stats["win"] / n, "losses": stats["loss"] / n, "ties": stats["tie"] / n}


# ---------------------------------------------------------------- results


def write_results(out: Path, results: dict, started: float, timings: dict, args, final: bool = False,
                  names: tuple[str, str] = ("RESULTS.md", "results.json")) -> None:
    """OUT/RESULTS.md and OUT/results.json; at the end with --write-results also `names` next to this script."""
    from report import render_results

    results = {**results, "wall_seconds": time.time() - started, "stage_seconds": timings, "complete": final,
               "quick": args.quick}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = render_results(results)
    (out / "RESULTS.md").write_text(text)
    if final:
        log(f"done in {results['wall_seconds'] / 60:.1f} min; {out / 'RESULTS.md'}")
        if args.write_results:
            (HERE / names[0]).write_text(text)
            (HERE / names[1]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
