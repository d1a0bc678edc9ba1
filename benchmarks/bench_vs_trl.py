"""dadpo against TRL's DPOTrainer: the same model, the same token ids, the same loss, in one run.

Both arms train plain DPO (sigmoid loss on summed response log-probs, beta = --beta; dadpo with
beta2 = 0, which is exactly that loss) from one random-init Qwen2 folder, with the reference
log-probs computed once before training, AdamW with the same settings, linear decay, clipping 1.0:

  trl             trl.DPOTrainer(precompute_ref_log_probs=True); the reference pass runs inside the
                  constructor (compute_ref_log_probs per batch); fp32/bf16 weights as given, autocast
                  and gradient checkpointing off (DPOConfig turns bf16 and checkpointing on by default)
  dadpo           the reference scored by dadpo.scoring.hf.HFScorer.score_pairs (what `cache-teacher
                  --backend hf` runs: prompts shared where the scorer's check holds), the rows `dadpo
                  train` reads, then dadpo's Trainer running the recipe's step (pair_batch ->
                  batch_loss -> backward -> optimizer_step) with the layout the trainer chooses
                  (prompts shared where the model allows it)
  dadpo-unshared  the same with prefix sharing off: the reference pass by score_pairs(shared=False)
                  in the same batches, training with --prefix-sharing off

Each arm runs in its own subprocess (peak memory = that process's VmHWM, reset between the
reference pass and training; CUDA max allocated on GPU); the parent has them take turns: the
reference passes one after the other, then one optimizer step at a time in rotating order (the
TRL arm waits inside a TrainerCallback at each step's start), so load from other jobs falls on
every arm alike. Step times are median over steps 2.. (step 1 pays one-time costs).

The sweep total: K runs of one epoch each over the pairs. TRL precomputes the reference in every
run: its precompute cache is keyed on the dataset's fingerprint and the weights, and an in-memory
dataset (as here) gets no reusable cache file, so each process pays again. dadpo caches once and
K runs read it. Start-up (imports, model loading) is left out of both.

TRL 1.16's fused LM head scores every position (prompts too) on a device without Triton, such as
a CPU, and only the response positions on a Triton GPU; dadpo scores response positions only
everywhere. So CPU ratios overstate the difference a GPU shows.

Checks: with policy == reference at step 0, every pair's margin is 0, so both first-step losses
must equal ln 2; each arm's reference log-probs are compared with a plain full-logits forward
computed here. When --pairs equals --batch-size every step trains on the same pairs, so the
arms' loss curves must agree step by step.

TRL takes text, not token ids: the ids travel as text through a word-level tokenizer ("t17" <->
id 17) that maps them back exactly; the script asserts TRL's tokenized columns equal the ids.
Examples:
  python benchmarks/bench_vs_trl.py                                     # 32/32, tiny model, CPU
  python benchmarks/bench_vs_trl.py --prompt-len 512 --response-len 128
  python benchmarks/bench_vs_trl.py --quick                             # seconds: wiring check
  python benchmarks/bench_vs_trl.py --device cuda --config qwen2.5-0.5b --prompt-len 512 --response-len 256 \\
      --pairs 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

from measure import Timer, Worker, machine_line, median_ratio, one_thread_env, preload, reset_peak_rss, rss_mb
from shapes import SHAPES, forward_flops, gpu_peak, save_model, total_params

EOS_ID, PAD_ID = 0, 1
EOS, PAD = "<|endoftext|>", "<|pad|>"
ARMS = ("trl", "dadpo", "dadpo-unshared")


# ---------------------------------------------------------------- shared assets


def ids_to_text(ids: list[int], leading_space: bool) -> str:
    """Token ids as text for the word-level tokenizer; EOS (a special token) glued to the word before."""
    text = "".join(EOS if i == EOS_ID else f" t{i}" for i in ids)
    return text if leading_space else text.lstrip(" ")


def build_tokenizer(vocab_size: int, folder: Path) -> Path:
    """A word-level tokenizer mapping "t<i>" to id i, in its own folder: in transformers 5,
    AutoTokenizer on a folder that also holds a Qwen2 config.json builds a Qwen2Tokenizer instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {EOS: EOS_ID, PAD: PAD_ID, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD).save_pretrained(folder)
    probe = [5, 17, vocab_size - 1, 2, EOS_ID]
    assert AutoTokenizer.from_pretrained(folder)(ids_to_text(probe, False))["input_ids"] == probe, \
        "the word-level tokenizer does not round-trip ids"
    return folder


def make_pairs(n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Random ids in [2, vocab); every response has response_len tokens and ends with EOS (so TRL adds none)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(2, vocab_size, k).tolist()  # noqa: E731
    return [{"id": f"pair-{i}", "prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len - 1) + [EOS_ID],
             "rejected_ids": ids(response_len - 1) + [EOS_ID]} for i in range(n)]


def plain_logps(model_dir: Path, pairs: list[dict], dtype: str, device: str) -> list[float]:
    """Independent reference: sum of response-token log-probs from a plain full-logits forward
    (fp32 log-softmax, float64 sum), one sequence at a time; chosen for every pair, then rejected."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    result = []
    with torch.no_grad():
        for key in ("chosen_ids", "rejected_ids"):
            for pair in pairs:
                ids = torch.tensor([pair["prompt_ids"] + pair[key]], device=device)
                logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
                first = len(pair["prompt_ids"])
                picked = logprobs[first - 1 : -1].gather(1, ids[0, first:, None]).squeeze(1)
                result.append(float(picked.double().sum()))
    del model
    return result


# ---------------------------------------------------------------- the arms (each in its own subprocess)


def arm_worker(conn, arm: str, settings: dict) -> None:
    """Answers ("precompute",), then ("step",) per optimizer step, then ("memory",), ("stop",)."""
    import torch

    torch.set_num_threads(settings["threads"])
    import transformers

    if arm == "trl":
        preload("transformers.models.qwen2.modeling_qwen2", "datasets", "trl.trainer.dpo_trainer")
    else:
        preload("transformers.models.qwen2.modeling_qwen2", "dadpo.logprobs", "dadpo.recipes.dadpo",
                "dadpo.training.trainer")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    baseline = rss_mb("VmRSS")
    pairs = json.loads(Path(settings["pairs_file"]).read_text())
    run = (TrlArm if arm == "trl" else DadpoArm)(arm, settings, pairs)
    phases = {}

    def memory_of(phase: str) -> None:
        phases[phase] = {"peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline}
        if settings["device"] == "cuda":
            phases[phase]["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()

    run.answer = lambda *message: conn.send(message)
    run.wait = lambda: _expect(conn.recv(), "step")
    conn.send(("ready",))
    while True:
        request = conn.recv()
        if request[0] == "stop":
            break
        if request[0] == "precompute":
            conn.send(("precompute", run.precompute()))
            memory_of("precompute")
        elif request[0] == "step":
            run.train()  # answers this request and waits for the following ones itself
            memory_of("train")
        elif request[0] == "memory":
            conn.send(("memory", phases))


def _expect(request, kind: str) -> None:
    if request[0] != kind:
        raise RuntimeError(f"expected a {kind!r} request, got {request[0]!r}")


class TrlArm:
    def __init__(self, arm, settings, pairs):
        self.settings, self.pairs = settings, pairs

    def precompute(self) -> dict:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        s, arm = self.settings, self
        reference = {"wall": 0.0, "cpu": 0.0, "batches": 0}

        class TimedDPOTrainer(DPOTrainer):
            # compute_ref_log_probs: the per-batch reference forward of the precompute loop
            def compute_ref_log_probs(self, model, inputs):
                with Timer() as timer:
                    out = super().compute_ref_log_probs(model, inputs)
                    if s["device"] == "cuda":
                        torch.cuda.synchronize()
                reference["wall"] += timer.wall
                reference["cpu"] += timer.cpu
                reference["batches"] += 1
                return out

        class Lockstep(TrainerCallback):
            """Each optimizer step waits for the parent's turn; its time goes back with the logged loss."""

            def __init__(self):
                self.first = True

            def on_step_begin(self, args, state, control, **kwargs):
                if self.first:  # train() called until here: TRL's start of training
                    arm.train_start.__exit__()
                else:
                    arm.wait()
                self.first = False
                if s["device"] == "cuda":
                    torch.cuda.synchronize()
                self.timer = Timer().__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if s["device"] == "cuda":
                    torch.cuda.synchronize()
                self.timer.__exit__()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    arm.answer("step", self.timer.wall, self.timer.cpu, float(logs["loss"]), False,
                               arm.train_start.wall, arm.train_start.cpu)

        tokenizer = AutoTokenizer.from_pretrained(s["tokenizer_dir"])
        dataset = Dataset.from_dict({
            "prompt": [ids_to_text(p["prompt_ids"], False) for p in self.pairs],
            "chosen": [ids_to_text(p["chosen_ids"], True) for p in self.pairs],
            "rejected": [ids_to_text(p["rejected_ids"], True) for p in self.pairs],
        })
        self.out_dir = tempfile.mkdtemp(prefix="trl-out-")
        config = DPOConfig(
            output_dir=self.out_dir, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="steps", logging_steps=1, disable_tqdm=True,
            use_cpu=s["device"] == "cpu", bf16=False, fp16=False, gradient_checkpointing=False,
            beta=s["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True,
            learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
            max_steps=s["steps"], max_length=None, seed=s["seed"], dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        with Timer() as setup:
            model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=getattr(torch, s["dtype"]))
            self.trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                           callbacks=[Lockstep()])
        self.trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
        prepared = self.trainer.train_dataset
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if prepared[column] != [p[column] for p in self.pairs]:
                raise RuntimeError(f"TRL's tokenized {column} differ from the generated ids")
        return {"wall": reference["wall"], "cpu": reference["cpu"], "batches": reference["batches"],
                "setup_wall": setup.wall, "setup_cpu": setup.cpu,
                "ref_logps": list(prepared["ref_chosen_logps"]) + list(prepared["ref_rejected_logps"])}

    def train(self) -> None:
        import shutil

        self.train_start = Timer().__enter__()
        self.trainer.train()
        shutil.rmtree(self.out_dir, ignore_errors=True)


class DadpoArm:
    def __init__(self, arm, settings, pairs):
        self.settings, self.pairs = settings, pairs
        self.sharing = "off" if arm == "dadpo-unshared" else "auto"

    def precompute(self) -> dict:
        import polars as pl
        import torch

        from dadpo.engine import EngineOptions
        from dadpo.logprobs import score_pairs
        from dadpo.scoring.hf import HFScorer
        from dadpo.modeling import resolve_model

        s = self.settings
        triples = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in self.pairs]
        sync = torch.cuda.synchronize if s["device"] == "cuda" else (lambda: None)
        with Timer() as setup:  # cache-teacher's scoring part: the model load, its check, the reference pass
            # batch_size counts sequences: 2 x pairs, as TRL's precompute batch (chosen + rejected rows)
            scorer = HFScorer(resolve_model(s["model_dir"]), s["dtype"],
                              EngineOptions(batch_size=2 * s["batch_size"], device=s["device"]), PAD_ID)
            shared = self.sharing != "off" and scorer.sharing_refused is None  # the scorer's start-up check
            with Timer() as timer:
                if self.sharing == "off":  # the same batches, each prompt computed twice
                    chosen, rejected = score_pairs(scorer.logprobs, triples, PAD_ID, scorer.device,
                                                   2 * s["batch_size"], shared=False)
                else:  # what `cache-teacher --backend hf` runs
                    chosen, rejected = scorer.score_pairs(triples)
                sync()
        scorer.close()
        n = len(self.pairs)
        # the columns `dadpo train` reads from a reference-only cache (plain DPO: beta2 = 0)
        self.rows = pl.DataFrame({
            "id": [p["id"] for p in self.pairs],
            "ref_prompt_ids": [p["prompt_ids"] for p in self.pairs],
            "ref_chosen_ids": [p["chosen_ids"] for p in self.pairs],
            "ref_rejected_ids": [p["rejected_ids"] for p in self.pairs],
            "ref_logp_chosen": chosen, "ref_logp_rejected": rejected,
            "ref_ntok_chosen": [len(p["chosen_ids"]) for p in self.pairs],
            "ref_ntok_rejected": [len(p["rejected_ids"]) for p in self.pairs],
        }, schema_overrides={name: pl.List(pl.Int32) for name in ("ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids")})
        assert self.rows.height == n
        return {"wall": timer.wall, "cpu": timer.cpu, "shared": shared, "setup_wall": setup.wall, "setup_cpu": setup.cpu,
                "ref_logps": [float(x) for x in chosen] + [float(x) for x in rejected]}

    def train(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from dadpo.config import TrainConfig
        from dadpo.loss import METRIC_NAMES, metric_sums
        from dadpo.modeling import resolve_model
        from dadpo.recipes.dadpo import batch_loss, pair_batch
        from dadpo.training.trainer import Trainer, per_item_means

        s = self.settings
        train_start = Timer().__enter__()  # until the first step: the Trainer, its layout check, the first batch
        out = tempfile.mkdtemp(prefix="dadpo-run-")
        cfg = TrainConfig(cache="-", out=str(Path(out) / "run"), model=s["model_dir"], beta1=s["beta"], beta2=0.0,
                          lr=s["lr"], batch_size=s["batch_size"], grad_accum=1, max_steps=s["steps"],
                          lr_schedule="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, dtype=s["dtype"],
                          prefix_sharing=self.sharing, seed=s["seed"], progress=False)
        trainer = Trainer(cfg, model=resolve_model(s["model_dir"]),
                          tokenizer=AutoTokenizer.from_pretrained(s["tokenizer_dir"]), train_rows=self.rows.height,
                          unit="pairs", record={}, metric_names=METRIC_NAMES, say=lambda line: print(line, file=sys.stderr))
        shared, packed = trainer.choose_layout(pairs=True)

        def make_batch(rows):
            return pair_batch(rows, PAD_ID, {}, "sum", shared=shared, packed=packed)

        sync = torch.cuda.synchronize if s["device"] == "cuda" else (lambda: None)
        for index, step in enumerate(trainer.steps(self.rows, make_batch)):
            if index:
                self.wait()
            else:
                train_start.__exit__()
            sync()
            # the recipe's loop body (dadpo.recipes.dadpo.train), timed
            with Timer() as timer:
                for batch in trainer.accumulate(step):
                    loss = batch_loss(trainer.policy, batch, cfg, trainer.device)
                    trainer.backward(loss.losses.sum(), step.normalizer, metric_sums(loss), batch.responses.num_tokens)
                line = trainer.optimizer_step(per_item_means, None)
                sync()
            self.answer("step", timer.wall, timer.cpu, float(line["loss"]), shared, train_start.wall, train_start.cpu)


# ---------------------------------------------------------------- the parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="tiny", choices=sorted(SHAPES), help="random-init Qwen2 shape")
    parser.add_argument("--dtype", default=None, help="float32 [cpu default] or bfloat16 [cuda default]")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (every pair)")
    parser.add_argument("--response-len", type=int, default=32, help="tokens of each response, EOS included")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (no accumulation)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps [default: one epoch]")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--sweep-points", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per arm [default: 1 on cpu]")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    parser.add_argument("--quick", action="store_true",
                        help="wiring check: micro model, 4 pairs of 16/8 tokens, every step on all 4 (losses compared "
                             "step by step), lr 1e-3, 3 steps")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.pairs, args.batch_size, args.steps, args.lr = "micro", 4, 4, 3, 1e-3
        args.prompt_len, args.response_len = min(args.prompt_len, 16), min(args.response_len, 8)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.steps = args.steps or max(1, args.pairs // args.batch_size)
    args.arms = [arm for arm in ARMS if arm in args.arms.split(",")]
    if args.response_len < 2 or args.prompt_len < 1:
        parser.error("--prompt-len >= 1 and --response-len >= 2 (a response ends with EOS)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.update(one_thread_env())
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    scratch = tempfile.TemporaryDirectory(prefix="bench-vs-trl-")
    work = Path(scratch.name)
    vocab = SHAPES[args.config]["vocab_size"]
    model_dir = save_model(args.config, args.dtype, work / "model", seed=args.seed,
                           device="cuda" if args.device == "cuda" else "cpu")
    _set_special_ids(model_dir)
    tokenizer_dir = build_tokenizer(vocab, work / "tokenizer")
    pairs = make_pairs(args.pairs, args.prompt_len, args.response_len, vocab, args.seed)
    (work / "pairs.json").write_text(json.dumps(pairs))
    plain = plain_logps(model_dir, pairs, args.dtype, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    tokens = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    from importlib.metadata import version

    print(f"bench_vs_trl: trl {version('trl')}, transformers {transformers.__version__}; {args.config} "
          f"({total_params(args.config) / 1e6:.2f}M params, vocab {vocab}), {args.dtype} on {args.device}; {args.pairs} "
          f"pairs of {args.prompt_len}/{args.response_len}/{args.response_len} tokens ({tokens} tokens as unshared); "
          f"{args.batch_size} pairs/step, {args.steps} steps; {threads} thread(s) per arm", flush=True)
    settings = {"pairs_file": str(work / "pairs.json"), "model_dir": str(model_dir), "tokenizer_dir": str(tokenizer_dir),
                "device": args.device, "dtype": args.dtype, "beta": args.beta, "lr": args.lr,
                "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed, "threads": threads}
    workers = {}
    try:
        for arm in args.arms:
            workers[arm] = Worker(arm, arm_worker, arm, settings)
        for worker in workers.values():
            worker.receive("ready")
        precompute = {arm: w.call("precompute", kind="precompute")[1] for arm, w in workers.items()}
        print("  reference passes: " + ", ".join(f"{arm} {p['wall']:.2f} s" for arm, p in precompute.items()),
              flush=True)
        steps = {arm: {"wall": [], "cpu": [], "loss": [], "shared": None} for arm in workers}
        arms = list(workers)
        for index in range(args.steps):
            for arm in arms[index % len(arms):] + arms[:index % len(arms)]:
                answer = workers[arm].call("step", kind="step")
                steps[arm]["wall"].append(answer[1])
                steps[arm]["cpu"].append(answer[2])
                steps[arm]["loss"].append(answer[3])
                steps[arm]["shared"] = answer[4]
                steps[arm]["train_start"] = {"wall": answer[5], "cpu": answer[6]}
            print(f"  step {index + 1}: " + ", ".join(f"{arm} {steps[arm]['wall'][-1]:.3f} s" for arm in arms), flush=True)
        memory = {arm: w.call("memory", kind="memory")[1] for arm, w in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    return report(args, pairs, tokens, plain, precompute, steps, memory)


def _set_special_ids(model_dir: Path) -> None:
    """EOS 0 and PAD 1 in the model's config and generation config, as the tokenizer has them."""
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            config = json.loads(path.read_text())
            config.update(eos_token_id=EOS_ID, pad_token_id=PAD_ID)
            path.write_text(json.dumps(config, indent=2))


def report(args, pairs, tokens, plain, precompute, steps, memory) -> dict:
    on_cpu = args.device == "cpu"
    clock = "cpu" if on_cpu else "wall"
    peak_name, peak = (None, None) if on_cpu else gpu_peak(args.peak_tflops)
    lengths = [(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    ln2 = math.log(2)
    rows = {}
    for arm in steps:
        later = lambda key: steps[arm][key][1:] or steps[arm][key]  # noqa: E731
        p = precompute[arm]
        train_memory = memory[arm].get("train", {})
        pre_memory = memory[arm].get("precompute", {})
        shared = bool(steps[arm]["shared"])
        step_s = statistics.median(later(clock))
        step_pairs = lengths[: args.batch_size]
        rows[arm] = {
            "ref_s": p[clock], "ref_tokens_per_s": tokens / p[clock], "ref_phase_s": p[f"setup_{clock}"],
            "train_start_s": steps[arm]["train_start"][clock],
            "ref_shared": p.get("shared", False), "step_s": step_s, "step_wall_s": statistics.median(later("wall")),
            "step1_s": steps[arm][clock][0], "train_flops_per_s": 3 * forward_flops(args.config, step_pairs, shared) / step_s,
            "peak_rss_train_mb": train_memory.get("peak_rss_mb", math.nan),
            "peak_rss_precompute_mb": pre_memory.get("peak_rss_mb", math.nan),
            "baseline_rss_mb": train_memory.get("baseline_rss_mb", math.nan),
            "cuda_train_mb": train_memory.get("cuda_max_allocated_mb"),
            "cuda_precompute_mb": pre_memory.get("cuda_max_allocated_mb"),
            "first_loss": steps[arm]["loss"][0], "losses": steps[arm]["loss"], "shared": shared,
            "max_ref_vs_plain": max(abs(a - b) for a, b in zip(p["ref_logps"], plain)),
            "max_ref_rel_vs_plain": max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(p["ref_logps"], plain)),
        }
        if peak:
            rows[arm]["mfu"] = rows[arm]["train_flops_per_s"] / peak
    print(f"\nfirst-step loss: policy == reference at step 0, so every margin is 0 and the loss is ln 2 = {ln2:.9f}")
    unit = "CPU s" if on_cpu else "s"
    rate_unit = "tokens per CPU s" if on_cpu else "tokens/s"
    print(f"| arm | reference pass {unit} | ref {rate_unit} | ref phase / train start {unit} | s/step ({clock}, "
          f"steps 2..) | step 1 {unit} | {'GFLOP/s' if on_cpu else 'MFU'} | peak RSS train / ref phase MB | train peak above imports MB |"
          f"{'' if on_cpu else ' CUDA max alloc train / ref MB |'} first-step loss - ln 2 | max |ref - plain fwd| (relative) |")
    print("|---|---|---|---|---|---|---|---|---|" + ("" if on_cpu else "---|") + "---|---|")
    for arm, r in rows.items():
        rate = f"{r['train_flops_per_s'] / 1e9:.2f}" if on_cpu else (f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a")
        cells = [arm + (" (prompts shared)" if r["shared"] else ""), f"{r['ref_s']:.3f}", f"{r['ref_tokens_per_s']:.0f}",
                 f"{r['ref_phase_s']:.2f} / {r['train_start_s']:.2f}", f"{r['step_s']:.4f}", f"{r['step1_s']:.4f}", rate,
                 f"{r['peak_rss_train_mb']:.0f} / {r['peak_rss_precompute_mb']:.0f}",
                 f"{r['peak_rss_train_mb'] - r['baseline_rss_mb']:.0f}"]
        if not on_cpu:
            cells.append(f"{r['cuda_train_mb'] or math.nan:.0f} / {r['cuda_precompute_mb'] or math.nan:.0f}")
        cells += [f"{r['first_loss'] - ln2:+.1e}", f"{r['max_ref_vs_plain']:.1e} ({r['max_ref_rel_vs_plain']:.0e})"]
        print("| " + " | ".join(cells) + " |")
    ratios = {}
    if "dadpo" in rows and "dadpo-unshared" in rows:
        # prefix sharing alone: the same code, prompts computed once against twice
        ratios["dadpo/dadpo-unshared step"] = median_ratio(steps["dadpo"][clock][1:] or steps["dadpo"][clock],
                                                           steps["dadpo-unshared"][clock][1:] or steps["dadpo-unshared"][clock])
        ratios["dadpo/dadpo-unshared ref pass"] = rows["dadpo"]["ref_s"] / rows["dadpo-unshared"]["ref_s"]
        print(f"\nprefix sharing (dadpo/dadpo-unshared, {clock} time): step {ratios['dadpo/dadpo-unshared step']:.3f}, "
              f"reference pass {ratios['dadpo/dadpo-unshared ref pass']:.3f}")
    if "trl" in rows:
        print()
        for arm in (a for a in rows if a != "trl"):
            ratios[f"{arm}/trl step"] = median_ratio(steps[arm][clock][1:] or steps[arm][clock],
                                                     steps["trl"][clock][1:] or steps["trl"][clock])
            ratios[f"{arm}/trl ref pass"] = rows[arm]["ref_s"] / rows["trl"]["ref_s"]
            ratios[f"{arm}/trl peak RSS train"] = rows[arm]["peak_rss_train_mb"] / rows["trl"]["peak_rss_train_mb"]
            above = lambda r: r["peak_rss_train_mb"] - r["baseline_rss_mb"]  # noqa: E731
            ratios[f"{arm}/trl train peak above imports"] = above(rows[arm]) / above(rows["trl"])
            if not on_cpu and rows[arm]["cuda_train_mb"] and rows["trl"]["cuda_train_mb"]:
                ratios[f"{arm}/trl CUDA train peak"] = rows[arm]["cuda_train_mb"] / rows["trl"]["cuda_train_mb"]
            print(f"{arm}/trl: step {ratios[f'{arm}/trl step']:.3f} (median of per-step ratios, {clock} time), "
                  f"reference pass {ratios[f'{arm}/trl ref pass']:.3f}, peak RSS in training "
                  f"{ratios[f'{arm}/trl peak RSS train']:.3f} (above imports "
                  f"{ratios[f'{arm}/trl train peak above imports']:.3f})"
                  + (f", CUDA peak in training {ratios[f'{arm}/trl CUDA train peak']:.3f}"
                     if f"{arm}/trl CUDA train peak" in ratios else ""))
        k, run_steps = args.sweep_points, max(1, args.pairs // args.batch_size)
        trl_total = k * (rows["trl"]["ref_s"] + run_steps * rows["trl"]["step_s"])
        for arm in (a for a in rows if a != "trl"):
            total = rows[arm]["ref_s"] + k * run_steps * rows[arm]["step_s"]
            ratios[f"{arm}/trl sweep"] = total / trl_total
            print(f"{k}-point sweep of one-epoch runs ({run_steps} steps each, {clock} time): trl {trl_total:.2f} s "
                  f"(reference pass in every run), {arm} {total:.2f} s (reference once) = "
                  f"{ratios[f'{arm}/trl sweep']:.3f}x")
    first = {arm: r["first_loss"] for arm, r in rows.items()}
    agreement = {"first_losses": first, "max_first_loss_vs_ln2": max(abs(v - ln2) for v in first.values()),
                 "max_first_loss_spread": max(first.values()) - min(first.values())}
    if args.pairs == args.batch_size and len(rows) > 1:
        curves = [r["losses"] for r in rows.values()]
        agreement["max_loss_curve_spread"] = max(max(c[i] for c in curves) - min(c[i] for c in curves)
                                                 for i in range(len(curves[0])))
    print("loss agreement: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else
                                         f"{k} " + " ".join(f"{a}={x:.9f}" for a, x in v.items())
                                         for k, v in agreement.items()))
    print(f"({machine_line()})")
    summary = {"args": vars(args), "tokens": tokens, "rows": rows, "ratios": ratios, "agreement": agreement,
               "gpu": peak_name, "machine": machine_line(), "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
