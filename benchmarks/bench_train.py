"""Training step cost: cached daDPO vs a plain-NLL floor vs live daDPO, measured side by side.

All arms run on the same global batches, interleaved round by round (the order rotates), on
one student and one optimizer:

  a  cached daDPO   the trainer's own step: dadpo.training.micro_batches (polars rows of the
                    cache -> collated tensors, done inline here, i.e. without the trainer's
                    prefetch) + dadpo.training.train_step with dadpo.train's daDPO objective
  b  floor          the same train_step on the same tokens with a plain NLL objective over
                    pre-built batches: no cache reads, no daDPO arithmetic
  c  live daDPO     as TRL/OpenRLHF-style code runs it: the reference and the teacher (on its
                    own, pre-tokenized ids) forward every step, then the daDPO loss and step
  s  scoring        the reference and teacher forwards alone: what cache-teacher pays once
                    per batch (hf backend), used for the sweep total

Reported: median step seconds, the ratios a/b (target <= 1.02) and c/a, the peak memory of
each arm (each in a fresh subprocess: RSS on CPU, CUDA max allocated on GPU), and the total
cost of a K-point beta sweep: cache once + K cached runs vs K live runs.

Models are random-init Qwen2 configs (hard-coded Qwen2.5 shapes, or tiny ones); token ids are
random (speed does not depend on the text). Examples:
  python benchmarks/bench_train.py                       # tiny shapes on the CPU
  python benchmarks/bench_train.py --device cuda --student-config qwen2.5-0.5b --teacher-config qwen2.5-7b \\
      --pairs-per-step 32 --batch-size 8 --prompt-len 256 --response-len 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Two tiny CPU shapes and the Qwen2.5 shapes (benchmarks/shapes.py).
from shapes import QWEN25_SHAPES  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    "tiny-4x": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=9000, tie_word_embeddings=False),
    **QWEN25_SHAPES,
}
ARMS = ("a", "b", "c", "s")
TIMED = ARMS + ("b2",)  # b2: the floor again, so the run shows its own noise (b2/b)
ARM_NAMES = {"a": "cached daDPO step", "b": "floor: plain NLL step", "c": "live daDPO step (ref + teacher fwd)",
             "s": "scoring only (ref + teacher fwd)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--student-config", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--teacher-config", default="tiny-4x", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 [default: float32 on cpu, bfloat16 on cuda]")
    parser.add_argument("--pairs-per-step", type=int, default=8, help="global batch (pairs)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--prompt-len", type=int, default=48, help="mean prompt tokens (uniform +-50%%)")
    parser.add_argument("--response-len", type=int, default=48, help="mean response tokens (uniform +-50%%)")
    parser.add_argument("--teacher-length-factor", type=float, default=1.15,
                        help="teacher tokenization length / student's (a different tokenizer)")
    parser.add_argument("--steps", type=int, default=4, help="distinct global batches, cycled")
    parser.add_argument("--cache-pairs", type=int, default=20000,
                        help="rows in the cache the steps are drawn from (its size sets the cost of a read)")
    parser.add_argument("--rounds", type=int, default=20,
                        help="measured rounds, each running every arm once (a multiple of 5 balances the rotation)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: 1 on cpu]")
    parser.add_argument("--sweep-points", type=int, default=12, help="K for the sweep cost (the paper: 3 x 4)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm, print peak memory
    return parser.parse_args(argv)


# ---------------------------------------------------------------- setup


def build_model(shape: str, dtype, device, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # built in place, in its dtype: a 7B model never exists in fp32
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make_pairs(args, rng):
    """Random token ids with realistic length spread; teacher ids on their own vocabulary."""
    student_vocab = SHAPES[args.student_config]["vocab_size"]
    teacher_vocab = SHAPES[args.teacher_config]["vocab_size"]
    length = lambda mean: max(1, int(mean * rng.uniform(0.5, 1.5)))  # noqa: E731
    ids = lambda n, vocab: rng.integers(3, vocab, n).tolist()  # noqa: E731
    pairs = []
    for i in range(max(args.cache_pairs, args.steps * args.pairs_per_step)):
        lengths = [length(args.prompt_len), length(args.response_len), length(args.response_len)]
        factor = args.teacher_length_factor
        pairs.append({
            "id": f"pair-{i}",
            "ref_prompt_ids": ids(lengths[0], student_vocab), "ref_chosen_ids": ids(lengths[1], student_vocab),
            "ref_rejected_ids": ids(lengths[2], student_vocab),
            "teacher_ids": [ids(max(1, int(n * factor)), teacher_vocab) for n in lengths],
            "ref_logp_chosen": -float(rng.uniform(1, 3)) * lengths[1], "ref_logp_rejected": -float(rng.uniform(1, 3)) * lengths[2],
            "teacher_logp_chosen": -float(rng.uniform(1, 3)) * lengths[1],
            "teacher_logp_rejected": -float(rng.uniform(1, 3)) * lengths[2],
            "ref_ntok_chosen": lengths[1], "ref_ntok_rejected": lengths[2],
            "teacher_ntok_chosen": int(lengths[1] * factor), "teacher_ntok_rejected": int(lengths[2] * factor),
        })
    return pairs


def write_cache_rows(pairs, folder: Path):
    """The cached columns as a Parquet shard, read back with polars as dadpo.cache does."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dadpo.train import CACHED_COLUMNS

    table = pa.table({name: [p[name] for p in pairs] for name in CACHED_COLUMNS})
    for name in ("ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids"):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.list_(pa.int32())))
    for name in ("ref_ntok_chosen", "ref_ntok_rejected", "teacher_ntok_chosen", "teacher_ntok_rejected"):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.int32()))
    pq.write_table(table, folder / "shard-00000-of-00001.parquet", compression="zstd")
    return pl.read_parquet(folder / "shard-00000-of-00001.parquet")


class Bench:
    """The models, data and one step function per arm."""

    def __init__(self, args):
        import numpy as np
        import torch
        from accelerate import Accelerator

        from dadpo.logprobs import collate
        from dadpo.train import TrainConfig, dadpo_objective
        from dadpo.training import global_batch_rows

        self.args, self.torch = args, torch
        self.device = torch.device(args.device)
        self.accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="no")
        self.cfg = TrainConfig(cache="-", out="-", batch_size=args.batch_size,
                               grad_accum=args.pairs_per_step // args.batch_size, lr=1e-6, seed=0)
        self.global_batch = args.pairs_per_step
        pairs = make_pairs(args, np.random.default_rng(0))
        self.tmp = tempfile.TemporaryDirectory()
        self.rows = write_cache_rows(pairs, Path(self.tmp.name))
        self.steps_per_epoch = self.rows.height // self.global_batch
        self.objective = dadpo_objective(self.cfg, pad_id=0)

        # The same pairs, in the same micro-batches, pre-built for the arms that read no cache.
        by_id = {p["id"]: p for p in pairs}
        self.prebuilt = []  # per step: list of (student batch, teacher batch, cached tensor)
        for step in range(args.steps):
            rows = global_batch_rows(self.rows, step, self.global_batch, self.steps_per_epoch, self.cfg.seed)
            micro = []
            for start in range(0, rows.height, args.batch_size):
                chunk = [by_id[i] for i in rows["id"].slice(start, args.batch_size).to_list()]
                student = collate([(p["ref_prompt_ids"], p["ref_chosen_ids"]) for p in chunk]
                                  + [(p["ref_prompt_ids"], p["ref_rejected_ids"]) for p in chunk], 0)
                teacher = collate([(p["teacher_ids"][0], p["teacher_ids"][1]) for p in chunk]
                                  + [(p["teacher_ids"][0], p["teacher_ids"][2]) for p in chunk], 0)
                cached = self.objective.prepare(rows.slice(start, args.batch_size)).cached
                micro.append((student, teacher, cached))
            self.prebuilt.append(micro)
        self.tokens_per_step = sum(s.num_tokens for s, _, _ in self.prebuilt[0])

    def build_models(self, arms):
        import torch

        from dadpo.logprobs import ResponseLogprobs

        args, dtype = self.args, getattr(torch, self.args.dtype)
        self.policy = self.optimizer = self.scheduler = None
        if set(arms) & {"a", "b", "c"}:
            policy = ResponseLogprobs(build_model(args.student_config, dtype, self.device, seed=1)).train()
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
            self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        if set(arms) & {"c", "s"}:
            self.reference = ResponseLogprobs(build_model(args.student_config, dtype, self.device, seed=1)).eval()
            self.teacher = ResponseLogprobs(build_model(args.teacher_config, dtype, self.device, seed=2)).eval()
            for frozen in (self.reference, self.teacher):
                frozen.requires_grad_(False)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _step(self, objective, batches):
        from dadpo.training import train_step

        return train_step(self.accelerator, self.policy, self.optimizer, self.scheduler, self.trainable, objective,
                          batches, float(self.global_batch), 1.0)

    def arm_a(self, step):
        from dadpo.training import micro_batches

        batches, normalizer = micro_batches(self.rows, step % self.args.steps, self.cfg, self.global_batch,
                                            self.steps_per_epoch, 0, self.objective)
        assert normalizer == self.global_batch
        return self._step(self.objective, batches)

    def arm_b(self, step):
        from dadpo.training import Objective, StepOutput

        def compute(policy, batch, device):
            losses = -policy(batch[0].to(device))  # sequence NLL of the same chosen + rejected tokens
            return StepOutput(losses.sum(), {"loss": float(losses.detach().sum()), "count": losses.numel()},
                              batch[0].num_tokens)

        floor = Objective(metric_names=("loss",), prepare=lambda batch: batch, compute=compute)
        return self._step(floor, self.prebuilt[step % self.args.steps])

    def arm_c(self, step):
        from dadpo.loss import dadpo_loss, metric_sums
        from dadpo.training import Objective, StepOutput

        torch = self.torch

        def compute(policy, batch, device):
            student, teacher, _ = batch
            student = student.to(device)
            with torch.no_grad():
                ref_logps = self.reference(student)
                teacher_logps = self.teacher(teacher.to(device))
            logps = policy(student)
            n = logps.shape[0] // 2
            result = dadpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], teacher_logps[:n],
                                teacher_logps[n:], self.cfg.beta1, self.cfg.beta2)
            return StepOutput(result.losses.sum(), metric_sums(result), student.num_tokens)

        from dadpo.loss import METRIC_NAMES

        live = Objective(metric_names=METRIC_NAMES, prepare=lambda batch: batch, compute=compute)
        return self._step(live, self.prebuilt[step % self.args.steps])

    def arm_s(self, step):
        with self.torch.no_grad():
            for student, teacher, _ in self.prebuilt[step % self.args.steps]:
                self.reference(student.to(self.device))
                self.teacher(teacher.to(self.device))


# ---------------------------------------------------------------- measuring


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, from /proc. getrusage's
    ru_maxrss would carry the parent's peak across fork + exec, and cannot be reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux: echo 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_of_arm(args) -> dict:
    """In this (fresh) process: build only what one arm needs, run it, report its peak memory."""
    import accelerate  # noqa: F401  (imported before the baseline, so it counts code, not data)
    import polars  # noqa: F401
    import torch
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import dadpo.train  # noqa: F401
    import dadpo.training  # noqa: F401

    import gc

    bench = Bench(args)  # data: the cache rows and pre-built batches every arm holds alike
    gc.collect()
    reset = reset_peak_rss()
    baseline = rss_mb("VmRSS") if reset else rss_mb()
    bench.build_models([args.memory_arm])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = getattr(bench, f"arm_{args.memory_arm}")
    for step in range(3):
        run(step)
    bench.sync()
    result = {"peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline}
    if args.device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_memory(argv: list[str]) -> dict:
    results = {}
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, *argv, "--memory-arm", arm], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"memory run of arm {arm} failed:\n{out.stderr[-3000:]}")
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.pairs_per_step % args.batch_size:
        raise SystemExit("--pairs-per-step must be a multiple of --batch-size")
    import torch

    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else torch.get_num_threads()))
    if args.memory_arm:
        print(json.dumps(memory_of_arm(args)))
        return

    bench = Bench(args)
    bench.build_models(ARMS)
    params = lambda model: sum(p.numel() for p in model.parameters()) / 1e6  # noqa: E731
    print(f"cache of {bench.rows.height} pairs; student {args.student_config} ({params(bench.policy):.1f}M params), teacher {args.teacher_config} "
          f"({params(bench.teacher):.1f}M), {args.dtype} on {args.device}, {args.pairs_per_step} pairs/step in "
          f"micro-batches of {args.batch_size}, {bench.tokens_per_step} student tokens/step, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    # Wall time, and on the CPU also this process's CPU time: with one thread the work runs in
    # this process, so CPU time is far less disturbed by other processes sharing the cores.
    wall = {arm: [] for arm in TIMED}
    cpu = {arm: [] for arm in TIMED}
    for round_index in range(args.warmup + args.rounds):
        order = TIMED[round_index % len(TIMED):] + TIMED[: round_index % len(TIMED)]
        for arm in order:
            bench.sync()
            started, started_cpu = time.perf_counter(), time.process_time()
            getattr(bench, f"arm_{arm.rstrip('2')}")(round_index)
            bench.sync()
            if round_index >= args.warmup:
                wall[arm].append(time.perf_counter() - started)
                cpu[arm].append(time.process_time() - started_cpu)
    median = {arm: statistics.median(values) for arm, values in wall.items()}
    median_cpu = {arm: statistics.median(values) for arm, values in cpu.items()}

    # a's own work timed alone: the cache read (polars gather + collate), which the trainer runs one
    # step ahead in a background thread, and the daDPO arithmetic (loss, its backward, metrics).
    from dadpo.loss import metric_sums
    from dadpo.train import pair_loss
    from dadpo.training import micro_batches

    reads = []
    for round_index in range(5 * args.steps):
        started = time.perf_counter()
        micro_batches(bench.rows, round_index % args.steps, bench.cfg, bench.global_batch, bench.steps_per_epoch, 0,
                      bench.objective)
        reads.append(time.perf_counter() - started)
    cached = bench.prebuilt[0][0][2].to(bench.device)
    n = cached.shape[0]
    loss_times = []
    for _ in range(50):
        logps = torch.randn(2 * n, dtype=torch.float64, device=bench.device, requires_grad=True)
        bench.sync()
        started = time.perf_counter()
        result = pair_loss(logps[:n], logps[n:], cached, bench.cfg)
        result.losses.sum().backward()
        metric_sums(result)
        bench.sync()
        loss_times.append(time.perf_counter() - started)
    read_s, loss_s = statistics.median(reads), statistics.median(loss_times)
    memory = {} if args.skip_memory else measure_memory(argv)

    def per_round(times, x, y):
        return statistics.median(p / q for p, q in zip(times[x], times[y]))

    on_cpu = args.device == "cpu"
    print()
    print("| arm | what | median wall s/step |" + (" median CPU s/step |" if on_cpu else "") +
          " peak RSS MB | RSS above imports + data MB |" + ("" if on_cpu else " CUDA max allocated MB |"))
    print("|---|---|---|---|---|" + ("---|"))
    for arm in ARMS:
        mem = memory.get(arm, {})
        peak, base = mem.get("peak_rss_mb", math.nan), mem.get("baseline_rss_mb", math.nan)
        cells = [arm, ARM_NAMES[arm], f"{median[arm]:.4f}"] + ([f"{median_cpu[arm]:.4f}"] if on_cpu else [])
        cells += [f"{peak:.0f}", f"{peak - base:.0f}"]
        if not on_cpu:
            cells.append(f"{mem.get('cuda_max_allocated_mb', math.nan):.0f}")
        print("| " + " | ".join(cells) + " |")
    print()
    clock = "CPU time" if on_cpu else "wall time"
    steady = cpu if on_cpu else wall
    print(f"a/b = {per_round(steady, 'a', 'b'):.4f} ({clock}; wall: {per_round(wall, 'a', 'b'):.4f}), median of "
          f"per-round ratios; targets <= 1.02 (issue 5), <= 1.05 (issue 2)")
    print(f"   noise check, the floor against itself: b2/b = {per_round(steady, 'b2', 'b'):.4f} ({clock}; "
          f"wall: {per_round(wall, 'b2', 'b'):.4f})")
    overhead = read_s + bench.cfg.grad_accum * loss_s
    print(f"   a's own work timed alone: cache read + collate {1000 * read_s:.2f} ms/step (done one step ahead in the "
          f"trainer) + daDPO loss/metrics {1000 * loss_s:.3f} ms x {bench.cfg.grad_accum} micro-batches "
          f"= {100 * overhead / median['b']:.2f}% of b")
    print(f"c/a = {per_round(steady, 'c', 'a'):.3f} ({clock}; wall: {per_round(wall, 'c', 'a'):.3f})")
    k = args.sweep_points
    use = median_cpu if on_cpu else median
    cached_total, live_total = use["s"] + k * use["a"], k * use["c"]
    print(f"{k}-point sweep, per global batch of data ({clock}): cache once + {k} cached runs = {cached_total:.3f} s, "
          f"{k} live runs = {live_total:.3f} s; live / cached = {live_total / cached_total:.2f}x")
    print(f"({platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {args.rounds} rounds after {args.warmup} warmup, arm order rotated)")


if __name__ == "__main__":
    main()
