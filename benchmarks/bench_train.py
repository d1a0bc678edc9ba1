"""Training step cost: cached daDPO (prompts shared or not) vs a plain-NLL floor vs live daDPO.

Every training arm is a step of dadpo's own Trainer (dadpo.training.Trainer: accelerate, AdamW,
the LR schedule, gradient clipping, the step's metrics line), on one student and one optimizer;
the arms differ only in the batch layout and the loss. They run on the same global batches,
interleaved round by round with the order rotated:

  a-shared    cached daDPO, the recipe's own step (dadpo.recipes.dadpo): pair_batch(shared=True)
              (one [prompt | chosen | rejected] row per pair, built one step ahead by the trainer's
              prefetch thread) -> batch_loss -> Trainer.backward -> Trainer.optimizer_step
  a-unshared  the same with pair_batch(shared=False): chosen and rejected as two sequences
  b           floor: the same Trainer step with a plain NLL loss on [prompt+chosen] and
              [prompt+rejected] (unshared): no cached log-probs, no daDPO arithmetic
  c           live daDPO, as TRL/OpenRLHF-style code runs it: the reference and the teacher (on its
              own token ids, ~15% longer) forward every step, then the daDPO loss and the step
  s           scoring: the reference and teacher forwards alone, what cache-teacher pays once
              per batch; with the live arm, it gives the cost of a K-point sweep
  (b2         the floor again: the run's own noise, b2/b)

c and s use the layout a-shared uses (prompts shared where the model allows it, as the trainer
decides), so c/a-shared and the sweep compare caching alone.

Reported: median s/step (wall and, on CPU, this process's CPU time), per-round ratios, the
training FLOP/s (benchmarks/shapes.py; MFU on CUDA), the step's peak memory: each arm in a fresh
subprocess (peak RSS on CPU, CUDA max allocated on GPU) unless --skip-memory, and on CUDA also
the in-process peak of each arm's step.

Models are random-init Qwen2 shapes (benchmarks/shapes.py); token ids are random (speed does
not depend on the text). Examples:
  python benchmarks/bench_train.py                                        # tiny shapes, CPU
  python benchmarks/bench_train.py --prompt-len 512 --response-len 128    # long prompts
  python benchmarks/bench_train.py --quick                                # seconds: wiring check
  python benchmarks/bench_train.py --device cuda --student-config qwen2.5-0.5b --teacher-config qwen2.5-1.5b \\
      --pairs-per-step 32 --batch-size 8 --prompt-len 512 --response-len 256
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import Timer, machine_line, median_ratio, preload, reset_peak_rss, rss_mb  # benchmarks/ is on sys.path
from shapes import SHAPES, forward_flops, gpu_peak, save_model, total_params

ARMS = ("a-shared", "a-unshared", "b", "c", "s")
TRAINING_ARMS = ("a-shared", "a-unshared", "b", "c")
ARM_NAMES = {"a-shared": "cached daDPO step, prompts shared", "a-unshared": "cached daDPO step, unshared",
             "b": "floor: plain NLL step (unshared)", "c": "live daDPO step (ref + teacher fwd)",
             "s": "scoring only (ref + teacher fwd)", "b2": "floor again (noise check)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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
    parser.add_argument("--steps", type=int, default=4, help="distinct global batches, cycled over the rounds")
    parser.add_argument("--cache-pairs", type=int, default=20000,
                        help="rows of the cache the steps read (its size sets the cost of a read)")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds, each running every arm once")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--packing", action="store_true", help="all sequences of a micro-batch in one row (--packing)")
    parser.add_argument("--attn-implementation", default=None, help="sdpa, eager, flex_attention, flash_attention_2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: 1 on cpu]")
    parser.add_argument("--sweep-points", type=int, default=12, help="K for the sweep cost (the paper: 3 x 4)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--skip-memory", action="store_true", help="no per-arm memory subprocesses")
    parser.add_argument("--quick", action="store_true",
                        help="wiring check: micro models, 2 pairs/step, 2 rounds after 1 warm-up, 64 cached pairs")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--memory-arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm, print peak memory
    args = parser.parse_args(argv)
    if args.quick:
        args.student_config = args.teacher_config = "micro"
        args.pairs_per_step, args.batch_size, args.steps = 2, 1, 2
        args.prompt_len, args.response_len = min(args.prompt_len, 24), min(args.response_len, 16)
        args.rounds, args.warmup, args.cache_pairs = 2, 1, 64
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.arms = [arm for arm in ARMS if arm in args.arms.split(",")]
    if args.pairs_per_step % args.batch_size:
        parser.error("--pairs-per-step must be a multiple of --batch-size")
    return args


# ---------------------------------------------------------------- data


def make_content(args, rng) -> list[list[dict]]:
    """`steps` global batches of random pairs: student ids, teacher ids (its own vocabulary, longer)
    and made-up cached log-probs; lengths uniform in [len/2, 3 len/2]."""
    student_vocab = SHAPES[args.student_config]["vocab_size"]
    teacher_vocab = SHAPES[args.teacher_config]["vocab_size"]
    length = lambda mean: max(1, int(mean * rng.uniform(0.5, 1.5)))  # noqa: E731
    ids = lambda n, vocab: rng.integers(3, vocab, n).tolist()  # noqa: E731
    batches = []
    for _ in range(args.steps):
        batch = []
        for _ in range(args.pairs_per_step):
            lengths = [length(args.prompt_len), length(args.response_len), length(args.response_len)]
            teacher_lengths = [max(1, int(n * args.teacher_length_factor)) for n in lengths]
            batch.append({
                "ref_prompt_ids": ids(lengths[0], student_vocab), "ref_chosen_ids": ids(lengths[1], student_vocab),
                "ref_rejected_ids": ids(lengths[2], student_vocab),
                "teacher_prompt_ids": ids(teacher_lengths[0], teacher_vocab),
                "teacher_chosen_ids": ids(teacher_lengths[1], teacher_vocab),
                "teacher_rejected_ids": ids(teacher_lengths[2], teacher_vocab),
                "ref_logp_chosen": -float(rng.uniform(1, 3)) * lengths[1],
                "ref_logp_rejected": -float(rng.uniform(1, 3)) * lengths[2],
                "teacher_logp_chosen": -float(rng.uniform(1, 3)) * teacher_lengths[1],
                "teacher_logp_rejected": -float(rng.uniform(1, 3)) * teacher_lengths[2],
                "ref_ntok_chosen": lengths[1], "ref_ntok_rejected": lengths[2],
                "teacher_ntok_chosen": teacher_lengths[1], "teacher_ntok_rejected": teacher_lengths[2],
            })
        batches.append(batch)
    return batches


def write_cache_rows(rows: list[dict], folder: Path):
    """The columns `dadpo train` reads, with the cache's Arrow types (dadpo.cache.layout), as a
    zstd Parquet shard, read back with polars as dadpo.cache does. The teacher's own token ids
    travel in three extra columns, for the live arm."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dadpo.cache.layout import shard_columns

    types = shard_columns([""])
    types.update({f"teacher_{part}_ids": pa.list_(pa.int32()) for part in ("prompt", "chosen", "rejected")})
    names = ["id"] + [name for name in rows[0] if name != "id"]
    table = pa.table({name: pa.array([row[name] for row in rows], type=types[name]) for name in names})
    path = folder / "shard-00000-of-00001.parquet"
    pq.write_table(table, path, compression="zstd")
    return pl.read_parquet(path)


# ---------------------------------------------------------------- the arms


class Bench:
    """The student (inside dadpo's Trainer), the frozen models, the cache rows and the arms' steps."""

    def __init__(self, args, arms):
        import numpy as np
        import polars as pl
        import torch

        from dadpo.config import TrainConfig
        from dadpo.training.data import global_batch_rows

        self.args, self.torch, self.arms = args, torch, arms
        self.device = torch.device(args.device)
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        self.content = make_content(args, np.random.default_rng(0))
        self.training = [arm for arm in arms if arm in TRAINING_ARMS]
        timed = list(arms) + (["b2"] if "b" in arms and args.memory_arm is None else [])
        self.timed = timed
        # The schedule: per round, every timed arm once, the order rotated; each training arm's step
        # is the trainer's next optimizer step.
        self.schedule = []  # (round, arm) per round slot
        for round_index in range(args.warmup + args.rounds):
            shift = round_index % len(timed)
            self.schedule += [(round_index, arm) for arm in timed[shift:] + timed[:shift]]
        training_slots = [(r, arm) for r, arm in self.schedule if arm.rstrip("2") in TRAINING_ARMS]
        self.global_batch = args.pairs_per_step
        num_rows = max(args.cache_pairs, (len(training_slots) + 1) * self.global_batch)
        self.cfg = TrainConfig(cache="-", out=str(Path(self.tmp.name) / "run"), batch_size=args.batch_size,
                               grad_accum=args.pairs_per_step // args.batch_size, lr=1e-6, lr_schedule="constant",
                               max_steps=max(1, len(training_slots)), dtype=args.dtype, packing=args.packing,
                               attn_implementation=args.attn_implementation, progress=False, seed=0)
        # Cache rows: the rows the trainer's k-th step reads (its seeded permutation) hold the content
        # batch of the round that step belongs to, so every arm of a round trains on the same pairs.
        steps_per_epoch = num_rows // self.global_batch
        index = pl.DataFrame({"row": np.arange(num_rows)})
        rows = [None] * num_rows
        self.arm_of_step = []
        for step, (round_index, arm) in enumerate(training_slots):
            batch = self.content[round_index % args.steps]
            taken = global_batch_rows(index, step, self.global_batch, steps_per_epoch, self.cfg.seed)["row"].to_list()
            for row, pair in zip(taken, batch):
                rows[row] = pair
            self.arm_of_step.append(arm.rstrip("2"))
        filler = [pair for batch in self.content for pair in batch]
        rows = [{"id": f"pair-{i}", **(pair or filler[i % len(filler)])} for i, pair in enumerate(rows)]
        self.rows = write_cache_rows(rows, Path(self.tmp.name))
        self.step_of_row = {}
        for step in range(len(training_slots)):
            for row in global_batch_rows(index, step, self.global_batch, steps_per_epoch, self.cfg.seed)["row"]:
                self.step_of_row[f"pair-{row}"] = step
        self.pair_lengths = [[(len(p["ref_prompt_ids"]), len(p["ref_chosen_ids"]), len(p["ref_rejected_ids"]))
                              for p in batch] for batch in self.content]
        self.teacher_lengths = [[(len(p["teacher_prompt_ids"]), len(p["teacher_chosen_ids"]),
                                  len(p["teacher_rejected_ids"])) for p in batch] for batch in self.content]
        self.trainer = self.reference = self.teacher = None
        self.shared = False

    # -- models

    def build_models(self) -> None:
        import torch

        from dadpo.loss import METRIC_NAMES
        from dadpo.logprobs import ResponseLogprobs
        from dadpo.modeling import resolve_model
        from dadpo.training.trainer import Trainer
        from shapes import build_model

        args, dtype = self.args, getattr(torch, self.args.dtype)
        folder = save_model(args.student_config, args.dtype, Path(self.tmp.name) / "student", seed=1,
                            device=args.device)
        if self.training:
            self.trainer = Trainer(self.cfg, model=resolve_model(str(folder)), tokenizer=None,
                                   train_rows=self.rows.height, unit="pairs", record={}, metric_names=METRIC_NAMES,
                                   say=lambda line: print(line, file=sys.stderr))
            # The trainer's own choice: prompts shared where the model passes check_sharing.
            self.shared, _ = self.trainer.choose_layout(pairs=True)
        else:
            from dadpo.errors import DadpoError
            from dadpo.layout_checks import check_sharing, probe_pairs

            # the trainer's check, on a model of the student's shape (scoring alone loads no student)
            probe = ResponseLogprobs(build_model(args.student_config, dtype, self.device, seed=1))
            try:
                check_sharing(probe, probe_pairs(SHAPES[args.student_config]["vocab_size"]), self.device, "student")
                self.shared = True
            except DadpoError:
                self.shared = False
            del probe
        if set(self.arms) & {"c", "s"}:
            self.reference = ResponseLogprobs(build_model(args.student_config, dtype, self.device, seed=1)).eval()
            self.teacher = ResponseLogprobs(build_model(args.teacher_config, dtype, self.device, seed=2)).eval()
            for frozen in (self.reference, self.teacher):
                frozen.requires_grad_(False)
        if "a-shared" in self.arms and not self.shared:
            print("note: the student cannot share prompts here; arm a-shared is left out", file=sys.stderr)
            self.arms = [arm for arm in self.arms if arm != "a-shared"]

    # -- batches (made by the trainer's prefetch thread, one step ahead)

    def make_batch(self, rows):
        """The micro-batch of whichever arm the schedule gives this step."""
        from dadpo.logprobs import collate, pair_sequences
        from dadpo.recipes.dadpo import pair_batch

        arm = self.arm_of_step[self.step_of_row[rows["id"][0]]]
        packed = self.args.packing
        if arm in ("a-shared", "a-unshared"):
            return pair_batch(rows, 0, {"": 1.0}, "sum", shared=arm == "a-shared", packed=packed)
        student = list(zip(rows["ref_prompt_ids"].to_list(), rows["ref_chosen_ids"].to_list(),
                           rows["ref_rejected_ids"].to_list()))
        if arm == "b":
            return collate(pair_sequences(student), 0, packed=packed)
        teacher = list(zip(rows["teacher_prompt_ids"].to_list(), rows["teacher_chosen_ids"].to_list(),
                           rows["teacher_rejected_ids"].to_list()))
        return self.live_batches(student, teacher)

    def live_batches(self, student, teacher):
        from dadpo.logprobs import collate, collate_pairs, pair_sequences

        packed = self.args.packing
        if self.shared:
            return collate_pairs(student, 0, packed=packed), collate_pairs(teacher, 0, packed=packed)
        return collate(pair_sequences(student), 0, packed=packed), collate(pair_sequences(teacher), 0, packed=packed)

    # -- one step of each arm

    def _train(self, step, loss_of) -> None:
        trainer = self.trainer
        for batch in trainer.accumulate(step):
            loss_sum, sums, tokens = loss_of(batch)
            trainer.backward(loss_sum, step.normalizer, sums, tokens)
        from dadpo.training.trainer import per_item_means

        trainer.optimizer_step(per_item_means, None)

    def run_cached(self, step) -> None:
        from dadpo.loss import metric_sums
        from dadpo.recipes.dadpo import batch_loss

        def loss_of(batch):
            out = batch_loss(self.trainer.policy, batch, self.cfg, self.trainer.device)
            return out.losses.sum(), metric_sums(out), batch.responses.num_tokens

        self._train(step, loss_of)

    def run_floor(self, step) -> None:
        from dadpo.loss import METRIC_NAMES

        def loss_of(batch):
            losses = -self.trainer.policy(batch.to(self.trainer.device))  # sequence NLL of chosen + rejected
            sums = dict.fromkeys(METRIC_NAMES, 0.0) | {"loss": float(losses.detach().sum()),
                                                       "count": float(losses.numel())}
            return losses.sum(), sums, batch.num_tokens

        self._train(step, loss_of)

    def run_live(self, step) -> None:
        from dadpo.loss import dadpo_loss, metric_sums

        torch, device = self.torch, self.trainer.device

        def loss_of(batch):
            student, teacher = (b.to(device) for b in batch)
            with torch.no_grad():
                ref_logps, teacher_logps = self.reference(student), self.teacher(teacher)
            logps = self.trainer.policy(student)
            n = logps.shape[0] // 2
            out = dadpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], teacher_logps[:n],
                             teacher_logps[n:], self.cfg.beta1, self.cfg.beta2)
            return out.losses.sum(), metric_sums(out), student.num_tokens

        self._train(step, loss_of)

    def run_scoring(self, round_index) -> None:
        batch = self.content[round_index % self.args.steps]
        size = self.args.batch_size
        with self.torch.no_grad():
            for start in range(0, len(batch), size):
                pairs = batch[start : start + size]
                student, teacher = self.live_batches(
                    [(p["ref_prompt_ids"], p["ref_chosen_ids"], p["ref_rejected_ids"]) for p in pairs],
                    [(p["teacher_prompt_ids"], p["teacher_chosen_ids"], p["teacher_rejected_ids"]) for p in pairs])
                self.reference(student.to(self.device))
                self.teacher(teacher.to(self.device))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run_schedule(self, on_slot=None) -> None:
        """Every slot of the schedule in order; on_slot(round, arm, timer, cuda_peak) after each."""
        torch = self.torch
        steps = self.trainer.steps(self.rows, self.make_batch) if self.trainer else iter(())
        runners = {"a-shared": self.run_cached, "a-unshared": self.run_cached, "b": self.run_floor,
                   "c": self.run_live}
        try:
            for round_index, arm in self.schedule:
                base = arm.rstrip("2")
                if base not in self.arms:
                    if base in TRAINING_ARMS and base in self.arm_of_step:
                        next(steps)  # a step planned for an arm left out (a-shared without sharing)
                    continue
                self.sync()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with Timer() as timer:
                    if base == "s":
                        self.run_scoring(round_index)
                    else:
                        runners[base](next(steps))
                    self.sync()
                peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else math.nan
                if on_slot:
                    on_slot(round_index, arm, timer, peak)
        finally:
            if hasattr(steps, "close"):
                steps.close()

    # -- FLOPs of one global batch of each arm

    def step_flops(self, arm: str, round_index: int) -> float:
        student = self.pair_lengths[round_index % self.args.steps]
        teacher = self.teacher_lengths[round_index % self.args.steps]
        s_shape, t_shape = self.args.student_config, self.args.teacher_config
        if arm == "s":
            return forward_flops(s_shape, student, self.shared) + forward_flops(t_shape, teacher, self.shared)
        shared = arm == "a-shared" or (arm == "c" and self.shared)
        train = 3 * forward_flops(s_shape, student, shared)
        if arm == "c":
            train += forward_flops(s_shape, student, shared) + forward_flops(t_shape, teacher, shared)
        return train


# ---------------------------------------------------------------- memory, one arm per process


def memory_of_arm(args) -> dict:
    """In this (fresh) process: build what one arm needs, run three of its steps, report peak memory."""
    import gc

    import torch

    preload("accelerate", "polars", "transformers.models.qwen2.modeling_qwen2", "dadpo.recipes.dadpo",
            "dadpo.training.trainer")
    args.warmup, args.rounds = 0, 3
    bench = Bench(args, [args.memory_arm])
    gc.collect()
    reset = reset_peak_rss()
    baseline = rss_mb("VmRSS") if reset else rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bench.build_models()
    bench.run_schedule()
    result = {"peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline}
    if args.device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_memory(argv: list[str], arms) -> dict:
    results = {}
    for arm in arms:
        out = subprocess.run([sys.executable, __file__, *argv, "--memory-arm", arm], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"memory run of arm {arm} failed:\n{out.stderr[-3000:]}")
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------- report


def report(args, bench, wall, cpu, cuda_peak, flops, memory, side) -> dict:
    import torch

    on_cpu = args.device == "cpu"
    steady = cpu if on_cpu else wall
    clock = "CPU time" if on_cpu else "wall time"
    peak_name, peak = gpu_peak(args.peak_tflops) if not on_cpu else (None, None)
    rows = {}
    for arm in bench.timed:
        if arm not in wall or not wall[arm]:
            continue
        seconds = statistics.median(steady[arm])
        rows[arm] = {"wall_s": statistics.median(wall[arm]), "cpu_s": statistics.median(cpu[arm]) if on_cpu else None,
                     "flops_per_s": statistics.median(f / t for f, t in zip(flops[arm], steady[arm])),
                     "seconds": seconds, **memory.get(arm, {})}
        if not on_cpu:
            rows[arm]["step_cuda_peak_mb"] = max(cuda_peak[arm])
        if peak:
            rows[arm]["mfu"] = rows[arm]["flops_per_s"] / peak
    header = "| arm | what | median wall s/step |" + (" median CPU s/step |" if on_cpu else "")
    header += " GFLOP/s |" if on_cpu else " TFLOP/s | MFU | step peak CUDA MB |"
    header += " peak RSS MB | RSS above imports + data MB |" + ("" if on_cpu else " CUDA max allocated MB |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for arm, row in rows.items():
        cells = [arm, ARM_NAMES[arm], f"{row['wall_s']:.4f}"]
        if on_cpu:
            cells += [f"{row['cpu_s']:.4f}", f"{row['flops_per_s'] / 1e9:.2f}"]
        else:
            mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a"
            cells += [f"{row['flops_per_s'] / 1e12:.1f}", mfu, f"{row['step_cuda_peak_mb']:.0f}"]
        peak_rss, base = row.get("peak_rss_mb", math.nan), row.get("baseline_rss_mb", math.nan)
        cells += [f"{peak_rss:.0f}", f"{peak_rss - base:.0f}"]
        if not on_cpu:
            cells.append(f"{row.get('cuda_max_allocated_mb', math.nan):.0f}")
        print("| " + " | ".join(cells) + " |")
    print()
    ratios = {}

    def ratio(x, y, label, target=None):
        if x in steady and y in steady and steady[x] and steady[y]:
            value, value_wall = median_ratio(steady[x], steady[y]), median_ratio(wall[x], wall[y])
            ratios[f"{x}/{y}"] = value
            ratios[f"{x}/{y} wall"] = value_wall
            goal = f"; target {target}" if target else ""
            print(f"{x}/{y} = {value:.4f} ({clock}; wall {value_wall:.4f}): {label}{goal}")

    ratio("a-shared", "a-unshared", "prompt sharing against none", "<= 0.75 on long prompts")
    ratio("a-unshared", "b", "cached daDPO against the floor, same layout", "<= 1.02")
    ratio("a-shared", "b", "cached daDPO with shared prompts against the (unshared) floor")
    ratio("b2", "b", "the floor against itself: this run's noise")
    best = "a-shared" if "a-shared" in steady else "a-unshared"
    ratio("c", best, "live daDPO against cached")
    if side:
        print(f"   the cached arm's own work timed alone: cache rows -> PairBatch {1000 * side['read_s']:.2f} ms/step "
              f"(made one step ahead by the trainer's prefetch thread) + daDPO loss/metrics "
              f"{1000 * side['loss_s']:.3f} ms x {bench.cfg.grad_accum} micro-batches")
    if "shared_vs_unshared_max_abs" in side:
        print(f"   the student's log-probs of one global batch, prompts shared vs not ({args.dtype}): max |difference| "
              f"{side['shared_vs_unshared_max_abs']:.2e} nats per sequence (relative "
              f"{side['shared_vs_unshared_max_rel']:.1e})")
    if best in rows and "c" in rows and "s" in rows:
        k = args.sweep_points
        cached_total = rows["s"]["seconds"] + k * rows[best]["seconds"]
        live_total = k * rows["c"]["seconds"]
        ratios["sweep live/cached"] = live_total / cached_total
        print(f"{k}-point sweep, per global batch of data ({clock}): cache once + {k} cached runs = "
              f"{cached_total:.3f} s, {k} live runs = {live_total:.3f} s; live / cached = {live_total / cached_total:.2f}x")
    print(f"({machine_line()}; {torch.get_num_threads()} torch thread(s); {args.rounds} rounds after {args.warmup} "
          f"warm-up, arm order rotated)")
    return {"rows": rows, "ratios": ratios, "side": side, "shared": bench.shared,
            "tokens_per_step": bench.tokens_per_step, "machine": machine_line(), "command": " ".join(sys.argv),
            "gpu": peak_name}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import os

    import torch

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the trainer's accelerate stays on the CPU even where a GPU is
    torch.set_num_threads(args.threads or (1 if args.device == "cpu" else torch.get_num_threads()))
    if args.memory_arm:
        print(json.dumps(memory_of_arm(args)))
        return

    bench = Bench(args, args.arms)
    bench.build_models()
    lengths = bench.pair_lengths[0]
    bench.tokens_per_step = {"unshared": sum(2 * p + c + r for p, c, r in lengths),
                             "shared": sum(p + c + r for p, c, r in lengths)}
    print(f"cache of {bench.rows.height} pairs; student {args.student_config} ({total_params(args.student_config) / 1e6:.1f}M "
          f"params), teacher {args.teacher_config} ({total_params(args.teacher_config) / 1e6:.1f}M), {args.dtype} on "
          f"{args.device}; {args.pairs_per_step} pairs/step in micro-batches of {args.batch_size}; "
          f"{bench.tokens_per_step['unshared']} student tokens/step unshared, {bench.tokens_per_step['shared']} shared; "
          f"prompt sharing {'on' if bench.shared else 'off'}; packing {'on' if args.packing else 'off'}; "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    wall = {arm: [] for arm in bench.timed}
    cpu = {arm: [] for arm in bench.timed}
    cuda_peak = {arm: [] for arm in bench.timed}
    flops = {arm: [] for arm in bench.timed}

    def on_slot(round_index, arm, timer, peak):
        if round_index >= args.warmup:
            wall[arm].append(timer.wall)
            cpu[arm].append(timer.cpu)
            cuda_peak[arm].append(peak)
            flops[arm].append(bench.step_flops(arm.rstrip("2"), round_index))

    bench.run_schedule(on_slot)
    side = side_measurements(bench) if "a-shared" in bench.arms or "a-unshared" in bench.arms else {}
    memory = {} if args.skip_memory else measure_memory(argv, bench.arms)
    summary = report(args, bench, wall, cpu, cuda_peak, flops, memory, side)
    summary.update(args=vars(args), wall=wall, cpu=cpu)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


def side_measurements(bench) -> dict:
    """The cached arm's own work, timed alone: rows -> PairBatch, and the daDPO arithmetic."""
    import time

    import torch

    from dadpo.loss import dadpo_loss, metric_sums
    from dadpo.recipes.dadpo import pair_batch
    from dadpo.training.data import global_batch_rows, process_rows

    cfg = bench.cfg
    steps_per_epoch = bench.rows.height // bench.global_batch
    reads = []
    for step in range(min(5 * bench.args.steps, len(bench.arm_of_step))):
        started = time.perf_counter()  # what the trainer's prefetch thread does per step
        rows = global_batch_rows(bench.rows, step, bench.global_batch, steps_per_epoch, cfg.seed)
        for micro in process_rows(rows, 0, cfg.batch_size, cfg.grad_accum):
            pair_batch(micro, 0, {"": 1.0}, "sum", shared=bench.shared, packed=bench.args.packing)
        reads.append(time.perf_counter() - started)
    n = bench.args.batch_size
    cached = torch.randn(n, 4, dtype=torch.float64, device=bench.device)
    times = []
    for _ in range(50):
        logps = torch.randn(2 * n, dtype=torch.float64, device=bench.device, requires_grad=True)
        bench.sync()
        started = time.perf_counter()
        out = dadpo_loss(logps[:n], logps[n:], cached[:, 0], cached[:, 1], cached[:, 2], cached[:, 3], cfg.beta1,
                         cfg.beta2)
        out.losses.sum().backward()
        metric_sums(out)
        bench.sync()
        times.append(time.perf_counter() - started)
    return {"read_s": statistics.median(reads), "loss_s": statistics.median(times), **layout_agreement(bench)}


def layout_agreement(bench) -> dict:
    """The student's log-probs of one global batch with prompts shared and not (dadpo.logprobs.score_pairs,
    eval mode): the largest |difference| per sequence, absolute (nats) and relative to |log-prob|."""
    import numpy as np

    from dadpo.logprobs import score_pairs

    if bench.trainer is None or not bench.shared:
        return {}
    pairs = [(p["ref_prompt_ids"], p["ref_chosen_ids"], p["ref_rejected_ids"]) for p in bench.content[0]]
    scored = {shared: np.concatenate(score_pairs(bench.trainer.policy, pairs, 0, bench.trainer.device,
                                                 2 * bench.args.batch_size, shared=shared))
              for shared in (True, False)}
    difference = np.abs(scored[True] - scored[False])
    return {"shared_vs_unshared_max_abs": float(difference.max()),
            "shared_vs_unshared_max_rel": float((difference / np.maximum(np.abs(scored[False]), 1.0)).max())}


if __name__ == "__main__":
    main()
