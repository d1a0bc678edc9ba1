"""The GPU benchmarks in one command, one table: scoring, training steps and dadpo vs TRL.

    python benchmarks/gpu_suite.py                         # one H100/H200: every component, ~8 minutes
    python benchmarks/gpu_suite.py --dry-run               # print the commands, run nothing
    python benchmarks/gpu_suite.py --device cpu --quick    # the same components at tiny shapes on the CPU
    python benchmarks/gpu_suite.py --only train-0.5b,vs-trl-0.5b --out /tmp/suite

Components (each script in its own subprocess, with a JSON result in --out):

  scoring-1.5b        bench_scoring: hf, hf-shared, vllm, vllm-shared on Qwen2.5-1.5B (bf16), MFU
  scoring-7b          the same on Qwen2.5-7B
  train-0.5b          bench_train: student Qwen2.5-0.5B, teacher 1.5B; prompts shared / not, floor,
                      live, scoring; MFU and each arm's step peak CUDA memory
  train-1.5b          the same with student 1.5B, teacher 7B
  train-0.5b-packed   bench_train with --packing (flash_attention_2 where flash-attn is installed,
                      else sdpa): every sequence of a micro-batch in one row
  vs-trl-0.5b         bench_vs_trl on Qwen2.5-0.5B, prompts 512, responses 256

Each component has a time limit; when the suite's --budget would run out before a component's
estimate, that component is skipped and the table says so. The numbers are whatever the
components measure; the estimates are guesses until a run has set them (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Component:
    name: str
    script: str
    gpu: list  # arguments on the GPU
    quick: list  # arguments of the --device cpu --quick run (the script's --quick sets tiny shapes)
    estimate_s: float  # guessed GPU seconds, for the budget
    needs: tuple = ()  # "vllm", "trl": skipped (with a note) where that does not import
    notes: list = field(default_factory=list)


def components(flash: bool) -> list[Component]:
    packed = ["--packing"] + (["--attn-implementation", "flash_attention_2"] if flash else [])
    scoring = ["--dtype", "bfloat16", "--prompt-len", "512", "--response-len", "256", "--repeats", "2",
               "--vllm-arg", "block_size=32"]
    train = ["--dtype", "bfloat16", "--pairs-per-step", "16", "--batch-size", "8", "--prompt-len", "512",
             "--response-len", "256", "--rounds", "5", "--warmup", "1", "--steps", "2", "--cache-pairs", "4096",
             "--skip-memory"]
    return [
        Component("train-0.5b", "bench_train.py",
                  ["--student-config", "qwen2.5-0.5b", "--teacher-config", "qwen2.5-1.5b", *train],
                  ["--skip-memory"], 60),
        Component("vs-trl-0.5b", "bench_vs_trl.py",
                  ["--config", "qwen2.5-0.5b", "--dtype", "bfloat16", "--prompt-len", "512", "--response-len", "256",
                   "--pairs", "64", "--batch-size", "8"],
                  ["--arms", "trl,dadpo"], 90, needs=("trl",)),
        Component("scoring-1.5b", "bench_scoring.py", ["--config", "qwen2.5-1.5b", "--pairs", "256", *scoring],
                  ["--modes", "hf,hf-shared,vllm,vllm-shared"], 120, needs=("vllm",)),
        Component("train-1.5b", "bench_train.py",
                  ["--student-config", "qwen2.5-1.5b", "--teacher-config", "qwen2.5-7b", *train],
                  ["--skip-memory", "--arms", "a-shared,a-unshared,b"], 80),
        Component("train-0.5b-packed", "bench_train.py",
                  ["--student-config", "qwen2.5-0.5b", "--teacher-config", "qwen2.5-1.5b", *train, *packed,
                   "--arms", "a-shared,a-unshared,b"],
                  ["--skip-memory", "--packing"], 45),
        Component("scoring-7b", "bench_scoring.py", ["--config", "qwen2.5-7b", "--pairs", "96", *scoring],
                  ["--modes", "hf,hf-shared"], 150, needs=("vllm",)),
    ]


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def command_of(component: Component, args, json_path: Path) -> list[str]:
    if args.quick:
        extra = ["--device", args.device, "--quick", *component.quick]
    else:
        extra = ["--device", args.device, *component.gpu]
    if component.script == "bench_scoring.py":
        extra += ["--model-dir", str(Path(args.out) / "models")]
        if args.quick and not importable("vllm"):
            extra += ["--modes", "hf,hf-shared"]
    return [sys.executable, str(HERE / component.script), *extra, "--json", str(json_path)]


def run_component(component: Component, args, json_path: Path, remaining: float) -> dict:
    command = command_of(component, args, json_path)
    log = json_path.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # one math thread per process, as every CPU number here
    started = time.monotonic()
    limit = max(30.0, remaining)
    with open(log, "w") as out:
        try:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=limit, env=env)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - started
    data = json.loads(json_path.read_text()) if status == "ok" and json_path.exists() else None
    if data is None and status == "ok":
        status = "no result"
    return {"status": status, "seconds": seconds, "data": data, "log": str(log), "command": command}


# ---------------------------------------------------------------- the table


def rows_of(name: str, script: str, data: dict) -> list[list[str]]:
    """[component, arm, median s, throughput, MFU or FLOP/s, ratios] rows of one component's JSON."""
    pct = lambda row: f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else \
        f"{row.get('flops_per_s', row.get('train_flops_per_s', 0)) / 1e9:.2f} GFLOP/s"  # noqa: E731
    out = []
    if script == "bench_scoring.py":
        for mode, row in data["modes"].items():
            extra = f"shared prompt tokens/pass {row['shared_prompt_tokens']:.0f} of {data['prompt_tokens']}" \
                if mode.endswith("shared") else ""
            out.append([name, mode, f"{row['seconds']:.2f} s/pass", f"{row['tokens_per_s']:.0f} tok/s", pct(row), extra])
        out.append([name, "ratios", "", "", "", ", ".join(f"{k} {v:.3f}" for k, v in data["ratios"].items())])
    elif script == "bench_train.py":
        for arm, row in data["rows"].items():
            memory = f"step peak CUDA {row['step_cuda_peak_mb']:.0f} MB" if row.get("step_cuda_peak_mb") else ""
            out.append([name, arm, f"{row['seconds']:.4f} s/step", "", pct(row), memory])
        out.append([name, "ratios", "", "", "", ", ".join(f"{k} {v:.3f}" for k, v in data["ratios"].items()
                                                          if not k.endswith("wall"))])
    elif script == "bench_vs_trl.py":
        for arm, row in data["rows"].items():
            memory = f"train peak RSS {row['peak_rss_train_mb']:.0f} MB" + (
                f", CUDA {row['cuda_train_mb']:.0f} MB" if row.get("cuda_train_mb") else "")
            out.append([name, arm, f"{row['step_s']:.4f} s/step", f"ref {row['ref_tokens_per_s']:.0f} tok/s", pct(row),
                        memory])
        agreement = data["agreement"]
        out.append([name, "ratios", "", "", "", ", ".join(f"{k} {v:.3f}" for k, v in data["ratios"].items()) +
                    f"; first-step loss - ln 2 <= {agreement['max_first_loss_vs_ln2']:.1e}"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="every component at its script's --quick shapes")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--only", default=None, help="comma-separated component names")
    parser.add_argument("--skip", default="", help="comma-separated component names to leave out")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole suite [default: 480 on cuda, unlimited with --quick]")
    parser.add_argument("--out", default=None, help="folder for each component's JSON and log [default: a temp folder]")
    parser.add_argument("--json", default=None, help="also write the suite's results here")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick and not args.dry_run:
        parser.error("--device cpu needs --quick (the GPU shapes would take hours on a CPU)")
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="gpu-suite-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    budget = args.budget or (float("inf") if args.quick else 480.0)
    flash = importable("flash_attn")
    plan = components(flash)
    names = {c.name for c in plan}
    chosen = set(args.only.split(",")) if args.only else names
    chosen -= set(filter(None, args.skip.split(",")))
    unknown = chosen - names
    if unknown:
        parser.error(f"unknown component(s) {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in plan)}")
    plan = [c for c in plan if c.name in chosen]
    if args.dry_run:
        for c in plan:
            print(f"# {c.name} (estimate {c.estimate_s:.0f} s on one H100/H200)")
            print(" ".join(shlex.quote(part) for part in command_of(c, args, Path(args.out) / f"{c.name}.json")))
        return 0

    started = time.monotonic()
    results = {}
    for c in plan:
        spent = time.monotonic() - started
        missing = [n for n in c.needs if not importable(n) and not (args.quick and n == "vllm")]
        if missing:
            results[c.name] = {"status": f"skipped ({', '.join(missing)} not installed)", "seconds": 0.0}
        elif not args.quick and spent + c.estimate_s > budget:
            results[c.name] = {"status": f"skipped (budget: {spent:.0f} s spent of {budget:.0f})", "seconds": 0.0}
        else:
            print(f"[{spent:5.0f} s] {c.name} ...", flush=True)
            results[c.name] = run_component(c, args, Path(args.out) / f"{c.name}.json", budget - spent)
            print(f"[{time.monotonic() - started:5.0f} s] {c.name}: {results[c.name]['status']} "
                  f"({results[c.name]['seconds']:.0f} s)", flush=True)
    total = time.monotonic() - started

    table = []
    for c in plan:
        result = results[c.name]
        if result.get("data"):
            table += rows_of(c.name, c.script, result["data"])
        else:
            table.append([c.name, "-", "", "", "", f"{result['status']}" + (f"; log {result['log']}"
                                                                            if "log" in result else "")])
    print("\n| component | arm / mode | median | throughput | MFU (GFLOP/s on CPU) | notes |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    attention = "flash_attention_2" if flash else "sdpa (flash-attn not installed)"
    print(f"\nsuite: {total:.0f} s on {args.device}{' (quick shapes)' if args.quick else ''}; packed runs use "
          f"{attention}; results and logs in {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": total, "results": results}, indent=1, default=str))
    failed = [name for name, r in results.items() if not r["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
