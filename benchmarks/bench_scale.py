"""A million pairs: wall time and peak memory of loading and planning a pairs file, by size.

For each N it writes N synthetic pairs as JSON Lines (prompts and responses of 100-300 words each;
string prompts, system + user messages and earlier exchanges; some responses as one-message
assistant lists), then runs `cache-teacher --plan-only` as the library call

    dadpo.cache.cache_teacher(CacheTeacherConfig(pairs=..., teacher=[T], reference=R, out=...,
                                                 backend="hf", plan_only=True))

in a fresh subprocess: the pairs are read, checked and normalised (dadpo.pairs), then every pair
is tokenized under both models' chat templates, shard by shard (in the plan's worker processes),
into CACHE/work/tokens/. The child first imports what the call needs and reads its resident
memory (VmRSS in /proc/self/status), then runs the call and reads its peak (VmHWM); it reports the
peak above its RSS with the imports done ("above imports": what the pairs cost), above a bare
interpreter, and the highest of its RSS plus its plan workers' private memory (sampled), also above
the imports.

With --score, a second fresh child then runs the same call without --plan-only over that plan: the
models score every pair (--score-backend, hf by default; tiny models unless --teacher/--reference
name others) and the shards are assembled; it reports the time, tokens/s and peak RSS the same way.
On CPU only small N are practical (tiny hf models score some 10^4-10^5 tokens/s).

Optionally (--read-check N) it then turns the N-pair plan into a finished cache (score files
with made-up log-probs beside the plan, then cache-teacher without --plan-only, which only
assembles) and measures what train's first steps cost: open_cache(...).read(its columns) and
split_eval in a fresh child, against the Arrow size of the columns read.

The models are tiny local ones (dadpo.tiny.build_tiny_model) unless --teacher/--reference name
others: only their tokenizers and chat templates matter here. Examples:
  python benchmarks/bench_scale.py                                   # N = 10k, 100k, 1M
  python benchmarks/bench_scale.py --sizes 10000,100000,300000 --read-check 100000
  python benchmarks/bench_scale.py --quick                           # N = 1k, short texts (the test)
  python benchmarks/bench_scale.py --sizes 1000,10000 --score        # plan, then score with the tiny models
  python benchmarks/bench_scale.py --sizes 1000000 --cache-workers 100   # load 1M, plan 1/100 of it
  python benchmarks/bench_scale.py --sizes 10000 --profile           # cProfile of the plan child
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Words of the tiny models' training text that both tiny tokenizers cover in one or two tokens: the
# synthetic text costs ~1.5 tokens a word, about what real tokenizers spend on English.
WORDS = ("a add am and answer are asked at be by can capital case commas correct correctly final five for fox from "
         "give good help here i in is large largest let letters made me might model no not numbers of one ones pairs "
         "question questions quick she six small smallest smile step student sum sure teacher that the them then "
         "there these think to today too very vowels was we word write writes you your").split()
# What a cache-teacher --plan-only run imports whatever the pairs: the plan child imports these before
# its baseline, so "above the imports" is what the pairs cost. (pyarrow imports pandas on the first
# pa.array of Python values; transformers' AutoTokenizer imports torch.)
IMPORTS = ("dadpo.cache", "dadpo.config", "dadpo.pairs", "dadpo.modeling", "dadpo.tokenization", "polars",
           "pyarrow.parquet", "pandas", "transformers")


# ---------------------------------------------------------------- children (fresh interpreters)


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def _tree_memory() -> int:
    """This process's resident memory plus its children's private memory (Private_Clean and
    Private_Dirty in smaps_rollup), in bytes: the plan's forked workers share this process's pages,
    counted once, and add what they write."""
    total, pids = _status()["VmRSS"], set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
        except OSError:
            pass
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Private_"))
        except (OSError, ValueError):
            pass  # a worker that just ended
    return total


class PeakSampler:
    """Samples _tree_memory() every 0.2 s on a thread; .peak is the highest seen."""

    def __init__(self):
        import threading

        self.peak, self.done = _tree_memory(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, _tree_memory())

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def _cpu_seconds() -> dict[str, float]:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_self_s": own.ru_utime + own.ru_stime, "cpu_children_s": children.ru_utime + children.ru_stime,
            "children_max_rss": children.ru_maxrss * 1024}


def _import_all() -> None:
    import importlib

    for name in IMPORTS:
        importlib.import_module(name)
    # transformers imports lazily; AutoTokenizer pulls in torch (and more) with it
    transformers = importlib.import_module("transformers")
    transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast


def child_bare(args: dict) -> dict:
    return _status()


def child_plan(args: dict) -> dict:
    started = time.perf_counter()
    _import_all()
    after_imports = _status()  # the baseline: an interpreter with the same imports
    modules_before = set(sys.modules)
    from dadpo.cache import CacheTeacherConfig, cache_teacher

    config = CacheTeacherConfig(pairs=args["pairs"], teacher=[args["teacher"]], reference=args["reference"],
                                out=args["out"], backend="hf", dtype="float32", shard_size=args["shard_size"],
                                plan_only=True, progress=False, num_workers=args.get("cache_workers", 1),
                                plan_workers=args.get("plan_workers", 0))
    cpu_before, sampler = _cpu_seconds(), PeakSampler()
    run_started = time.perf_counter()
    if args.get("profile"):
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        summary = profiler.runcall(cache_teacher, config)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
    else:
        summary = cache_teacher(config)
    run_seconds = time.perf_counter() - run_started
    tree_peak, cpu = sampler.stop(), _cpu_seconds()
    new_modules = sorted({name.split(".")[0] for name in set(sys.modules) - modules_before})
    return {**_status(), "imports": after_imports, "run_seconds": run_seconds, "plan_seconds": summary.plan_seconds,
            "tree_peak": tree_peak, "children_max_rss": cpu["children_max_rss"],
            "cpu_s": cpu["cpu_self_s"] - cpu_before["cpu_self_s"] + cpu["cpu_children_s"] - cpu_before["cpu_children_s"],
            "planned_shards": summary.planned, "num_shards": summary.num_shards,
            "child_seconds": time.perf_counter() - started, "modules_imported_during_run": new_modules}


def child_read(args: dict) -> dict:
    """train's first steps on a finished cache: open_cache(...).read(its columns), then split_eval."""
    _import_all()
    from dadpo.cache import open_cache
    from dadpo.training.data import split_eval

    after_imports = _status()
    started = time.perf_counter()
    rows = open_cache(args["cache"]).read(args["columns"])
    read_seconds = time.perf_counter() - started
    after_read = _status()
    train_rows, eval_rows = split_eval(rows, 0.05)
    after_split = _status()
    token_ids = sum(int(rows[name].list.len().sum()) for name in rows.columns if name.endswith("_ids"))
    return {**_status(), "imports": after_imports, "after_read": after_read, "after_split": after_split,
            "read_seconds": read_seconds, "rows": rows.height, "estimated_bytes": rows.estimated_size(),
            "token_ids": token_ids,
            "train_rows": train_rows.height, "eval_rows": eval_rows.height,
            "dtypes": {name: str(dtype) for name, dtype in rows.schema.items()}}


def child_assemble(args: dict) -> dict:
    """cache-teacher without --plan-only over a plan whose scores are all on disk: assembles only."""
    _import_all()
    after_imports = _status()
    from dadpo.cache import CacheTeacherConfig, cache_teacher

    config = CacheTeacherConfig(pairs=args["pairs"], teacher=[args["teacher"]], reference=args["reference"],
                                out=args["out"], backend="hf", dtype="float32", shard_size=args["shard_size"],
                                progress=False)
    started = time.perf_counter()
    summary = cache_teacher(config)
    return {**_status(), "imports": after_imports, "seconds": time.perf_counter() - started,
            "complete": summary.complete, "rows": summary.rows}


def child_score(args: dict) -> dict:
    """cache-teacher without --plan-only over the plan: every model scores its shards, then assembly."""
    _import_all()
    after_imports = _status()
    from dadpo.cache import CacheTeacherConfig, cache_teacher

    config = CacheTeacherConfig(pairs=args["pairs"], teacher=[args["teacher"]], reference=args["reference"],
                                out=args["out"], backend=args["backend"], dtype="float32",
                                shard_size=args["shard_size"], progress=False, plan_workers=args["plan_workers"])
    sampler, started = PeakSampler(), time.perf_counter()
    summary = cache_teacher(config)
    return {**_status(), "imports": after_imports, "seconds": time.perf_counter() - started,
            "tree_peak": sampler.stop(), "complete": summary.complete, "rows": summary.rows,
            "passes": summary.pass_stats}


CHILDREN = {"bare": child_bare, "plan": child_plan, "score": child_score, "assemble": child_assemble,
            "read": child_read}


def run_child(kind: str, args: dict | None = None, timeout: float | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args or {})]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"the {kind} child failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    if args and args.get("profile"):
        print(result.stderr, file=sys.stderr)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["process_seconds"] = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- inputs


def build_models(root: Path) -> tuple[Path, Path]:
    """A tiny teacher (Llama, byte-level BPE, ChatML) and reference (Qwen3, Metaspace BPE, zephyr-like
    template), with room for 4096 positions so no synthetic pair is over the length limit."""
    from dadpo.tiny import build_tiny_model

    folders = []
    for family, seed in (("teacher", 1), ("student", 2)):
        folder = root / family
        if not (folder / "dadpo_tiny.json").is_file():
            build_tiny_model(folder, family=family, seed=seed, hidden_size=64, num_heads=1, num_layers=1,
                             intermediate_size=64, max_position_embeddings=4096)
        folders.append(folder)
    return folders[0], folders[1]


def write_pairs(path: Path, n: int, words: list[str], min_words: int, max_words: int, seed: int = 0) -> None:
    """N pairs as JSON Lines, deterministic in (n, words, lengths, seed); written whole or not at all.
    Prompts: 50% a string, 35% system + user messages, 15% an earlier exchange then the question;
    responses: 80% strings, 20% one-message assistant lists (TRL's conversational explicit layout)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    encode = json.JSONEncoder(ensure_ascii=False).encode
    systems = ["You are a helpful assistant.", "Answer briefly and correctly.", "Think step by step, then answer."]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            lengths = rng.integers(min_words, max_words + 1, size=3 * count)  # prompt, chosen, rejected
            offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            text = vocab[rng.integers(0, len(vocab), size=offsets[-1])].tolist()
            styles, answers, picks = rng.random(count).tolist(), rng.random(2 * count).tolist(), rng.integers(
                0, len(systems), size=count).tolist()
            lines = []
            for i in range(count):
                prompt, chosen, rejected = (" ".join(text[offsets[3 * i + j]:offsets[3 * i + j + 1]]).capitalize()
                                            for j in range(3))
                if styles[i] < 0.5:
                    prompt = prompt + "?"
                elif styles[i] < 0.85:
                    prompt = [{"role": "system", "content": systems[picks[i]]}, {"role": "user", "content": prompt + "?"}]
                else:  # an earlier exchange: the prompt's words split over three turns
                    head, middle, tail = (" ".join(part) for part in np.array_split(prompt.split(" "), 3))
                    prompt = [{"role": "user", "content": head + "?"}, {"role": "assistant", "content": middle + "."},
                              {"role": "user", "content": tail + "?"}]
                row = {"id": f"p{start + i:08d}", "prompt": prompt}
                for side, response, choice in (("chosen", chosen, answers[2 * i]), ("rejected", rejected,
                                                                                     answers[2 * i + 1])):
                    row[side] = response + "." if choice < 0.8 else [{"role": "assistant", "content": response + "."}]
                lines.append(encode(row) + "\n")
            out.write("".join(lines))
    os.replace(tmp, path)


# ---------------------------------------------------------------- the report


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def tokens_per_pair(cache: Path) -> float:
    """Mean token ids per pair over both models (prompt + chosen + rejected), from the first shard."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((cache / "work" / "tokens").glob("*.parquet"))[0])
    total = sum(pc.sum(pc.list_value_length(table[name])).as_py() for name in table.column_names
                if name.endswith("_ids"))
    return total / max(table.num_rows, 1)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated numbers of pairs (default 10000,100000,1000000)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds, for the test: N = 1000 (unless --sizes), 10-40 words per text, shards of 250")
    parser.add_argument("--min-words", type=int, default=100, help="shortest prompt or response, in words")
    parser.add_argument("--max-words", type=int, default=300, help="longest prompt or response, in words")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--score", action="store_true",
                        help="after the plan, also score every pair (cache-teacher without --plan-only)")
    parser.add_argument("--score-backend", default="hf", choices=("hf", "vllm"), help="backend of --score")
    parser.add_argument("--teacher", help="teacher model folder (default: a tiny one built in --workdir)")
    parser.add_argument("--reference", help="reference model folder (default: a tiny one built in --workdir)")
    parser.add_argument("--plan-workers", type=int, default=0,
                        help="processes that tokenize the plan (default: the library's, one per CPU up to 8)")
    parser.add_argument("--cache-workers", type=int, default=1, metavar="W",
                        help="run as worker 0 of W (cache-teacher --num-workers): every pair is loaded, a 1/W "
                             "share of the shards planned; to measure the load of a large N in bounded time")
    parser.add_argument("--read-check", type=int, default=0, metavar="N",
                        help="also assemble the N-pair plan into a cache (made-up scores) and measure train's read")
    parser.add_argument("--workdir", help="where models, pairs files and caches go (default: a temporary folder; "
                                          "give one to reuse the models and pairs files across runs)")
    parser.add_argument("--profile", action="store_true", help="cProfile the plan children (printed to stderr)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.min_words, args.max_words, args.shard_size = args.sizes or "1000", 10, 40, 250
    sizes = [int(size) for size in (args.sizes or "10000,100000,1000000").split(",")]

    temporary = tempfile.TemporaryDirectory(prefix="dadpo-scale-") if not args.workdir else None
    workdir = Path(args.workdir or temporary.name)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher, reference = build_models(workdir / "models") if not (args.teacher and args.reference) else \
        (Path(args.teacher), Path(args.reference))
    bare = run_child("bare")
    print(f"bare interpreter: peak RSS {mib(bare['VmHWM'])} MiB (python {sys.version.split()[0]}, "
          f"{len(os.sched_getaffinity(0))} CPUs)", flush=True)

    results = []
    for n in sizes:
        pairs = workdir / f"pairs-{n}-{args.min_words}-{args.max_words}.jsonl"
        if not pairs.is_file():
            started = time.perf_counter()
            write_pairs(pairs, n, WORDS, args.min_words, args.max_words)
            print(f"wrote {pairs} ({mib(pairs.stat().st_size)} MiB) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        out = workdir / f"cache-{n}"
        shutil.rmtree(out, ignore_errors=True)
        plan = run_child("plan", {"pairs": str(pairs), "teacher": str(teacher), "reference": str(reference),
                                  "out": str(out), "shard_size": args.shard_size, "profile": args.profile,
                                  "plan_workers": args.plan_workers, "cache_workers": args.cache_workers})
        imports = plan["imports"]
        planned = sum(pq_rows(file) for file in (out / "work" / "tokens").glob("*.parquet"))
        load_s = plan["run_seconds"] - plan["plan_seconds"]
        row = {"n": n, "planned": planned, "workers": args.plan_workers or min(len(os.sched_getaffinity(0)), 8),
               "load_s": load_s, "plan_s": plan["plan_seconds"], "total_s": plan["run_seconds"], "cpu_s": plan["cpu_s"],
               "peak": plan["VmHWM"], "above_interpreter": plan["VmHWM"] - bare["VmHWM"],
               "above_imports": plan["VmHWM"] - imports["VmRSS"],
               "all_above_imports": plan["tree_peak"] - imports["VmRSS"], "imports": imports,
               "tokens_per_pair": tokens_per_pair(out), "pairs_bytes": pairs.stat().st_size,
               "plan_bytes": folder_bytes(out / "work" / "tokens"),
               "modules_imported_during_run": plan["modules_imported_during_run"]}
        results.append(row)
        print(f"N={n:,}: load {load_s:.1f} s, plan {row['plan_s']:.1f} s ({planned:,} pairs), peak RSS "
              f"{mib(row['peak'])} MiB (+{mib(row['above_imports'])} above the imports)", flush=True)
        if args.score:
            row["score"] = score(out, pairs, teacher, reference, args)
            print(f"N={n:,}: scored in {row['score']['seconds']:.1f} s, peak RSS {mib(row['score']['peak'])} MiB "
                  f"(+{mib(row['score']['above_imports'])} above the imports)", flush=True)
        if n == args.read_check:
            row["read_check"] = read_check(out, pairs, teacher, reference, args.shard_size)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    print()
    print(table(results, bare))
    if args.score:
        print()
        print(score_table(results))
    for row in results:
        if "read_check" in row:
            print()
            print(read_table(row["read_check"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"bare": bare, "results": results}, indent=1))


def pq_rows(file: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows


def fabricate_scores(cache: Path, prefixes: list[str]) -> None:
    """Score files with made-up log-probs beside a plan, as the passes would write them, so that
    cache-teacher without --plan-only only assembles the shards (no model runs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for tokens_file in sorted((cache / "work" / "tokens").glob("*.parquet")):
        for prefix in prefixes:
            names = ["pair_index", f"{prefix}_chosen_ids", f"{prefix}_rejected_ids"]
            tokens = pq.read_table(tokens_file, columns=names)
            rows = tokens.num_rows
            part = pa.table({"pair_index": tokens["pair_index"],
                             "logp_chosen": pa.array(-rng.random(rows) * 100, pa.float64()),
                             "logp_rejected": pa.array(-rng.random(rows) * 100, pa.float64()),
                             "ntok_chosen": pc.list_value_length(tokens[names[1]]).cast(pa.int32()),
                             "ntok_rejected": pc.list_value_length(tokens[names[2]]).cast(pa.int32()),
                             "key_chosen": pa.array(rng.integers(-2**62, 2**62, rows), pa.int64()),
                             "key_rejected": pa.array(rng.integers(-2**62, 2**62, rows), pa.int64())})
            part = part.replace_schema_metadata({"scored": str(2 * rows), "reused": "0"})
            (cache / "work" / prefix).mkdir(exist_ok=True)
            pq.write_table(part, cache / "work" / prefix / tokens_file.name)


def score(out: Path, pairs: Path, teacher: Path, reference: Path, args) -> dict:
    child = run_child("score", {"pairs": str(pairs), "teacher": str(teacher), "reference": str(reference),
                                "out": str(out), "shard_size": args.shard_size, "backend": args.score_backend,
                                "plan_workers": args.plan_workers})
    if not child["complete"]:
        raise SystemExit(f"--score: the cache {out} is not complete after scoring")
    tokens = sum(stats["tokens"] for stats in child["passes"].values())
    return {"seconds": child["seconds"], "rows": child["rows"], "tokens": tokens, "backend": args.score_backend,
            "peak": child["VmHWM"], "above_imports": child["VmHWM"] - child["imports"]["VmRSS"],
            "all_above_imports": child["tree_peak"] - child["imports"]["VmRSS"]}


def score_table(results: list[dict]) -> str:
    lines = ["| pairs | backend | score s | tokens scored | tokens/s | peak RSS MiB | above imports MiB "
             "| all processes above imports MiB |", "|" + "---:|" * 8]
    for row in results:
        done = row["score"]
        lines.append(f"| {row['n']:,} | {done['backend']} | {done['seconds']:,.1f} | {done['tokens']:,} "
                     f"| {done['tokens'] / max(done['seconds'], 1e-9):,.0f} | {mib(done['peak'])} "
                     f"| {mib(done['above_imports'])} | {mib(done['all_above_imports'])} |")
    lines.append("\nscore s: cache-teacher over the finished plan (every model's pass, then the shards assembled), "
                 "models loaded included; tokens: the sequences' tokens the passes scored.")
    return "\n".join(lines)


def read_check(out: Path, pairs: Path, teacher: Path, reference: Path, shard_size: int) -> dict:
    common = {"pairs": str(pairs), "teacher": str(teacher), "reference": str(reference), "out": str(out),
              "shard_size": shard_size}
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["complete"]:
        assembled = {"seconds": 0.0, "VmHWM": 0}  # scored for real (--score): nothing to make up
    else:
        fabricate_scores(out, ["teacher", "ref"])
        assembled = run_child("assemble", common)
    columns = ["id", "ref_prompt_ids", "ref_chosen_ids", "ref_rejected_ids", "ref_logp_chosen", "ref_logp_rejected",
               "ref_ntok_chosen", "ref_ntok_rejected"] + [f"teacher_{kind}_{side}" for kind in ("logp", "ntok")
                                                         for side in ("chosen", "rejected")]
    read = run_child("read", {"cache": str(out), "columns": columns})
    return {"assemble_s": assembled["seconds"], "assemble_peak": assembled["VmHWM"], "read_s": read["read_seconds"],
            "rows": read["rows"], "estimated_bytes": read["estimated_bytes"], "imports_rss": read["imports"]["VmRSS"],
            "after_read_rss": read["after_read"]["VmRSS"], "after_split_rss": read["after_split"]["VmRSS"],
            "read_peak": read["VmHWM"], "shard_bytes": folder_bytes(out / "shards"), "dtypes": read["dtypes"],
            "token_ids": read["token_ids"]}


def table(results: list[dict], bare: dict) -> str:
    lines = ["| pairs | planned | plan workers | load s | plan s | load pairs/s | plan pairs/s | CPU s "
             "| peak RSS MiB | above interpreter MiB | above imports MiB | all processes above imports MiB "
             "| token ids/pair | JSONL MiB | plan MiB |",
             "|" + "---:|" * 15]
    for row in results:
        lines.append(f"| {row['n']:,} | {row['planned']:,} | {row['workers']} | {row['load_s']:,.1f} "
                     f"| {row['plan_s']:,.1f} | {row['n'] / row['load_s']:,.0f} "
                     f"| {row['planned'] / max(row['plan_s'], 1e-9):,.0f} | {row['cpu_s']:,.0f} | {mib(row['peak'])} "
                     f"| {mib(row['above_interpreter'])} | {mib(row['above_imports'])} "
                     f"| {mib(row['all_above_imports'])} | {row['tokens_per_pair']:,.0f} | {mib(row['pairs_bytes'])} "
                     f"| {mib(row['plan_bytes'])} |")
    lines.append(f"\nload s: the call's time outside the plan (reading, checking and normalising the pairs, the "
                 f"models' tokenizers, the manifest); CPU s: the main process and its plan workers. peak RSS: the "
                 f"main process's VmHWM; all processes: the highest RSS of the main process plus its plan workers' "
                 f"private memory (sampled every 0.2 s); above imports: above the same process once it has "
                 f"imported what the call needs (RSS {mib(results[0]['imports']['VmRSS'])} MiB). Bare "
                 f"interpreter: RSS {mib(bare['VmHWM'])} MiB.")
    return "\n".join(lines)


def read_table(check: dict) -> str:
    int32_bytes = 4 * check["token_ids"]
    return "\n".join([
        f"train's first steps on the {check['rows']:,}-pair cache (shards {mib(check['shard_bytes'])} MiB on disk):",
        f"  assemble (cache-teacher over the plan and made-up scores): {check['assemble_s']:.1f} s, peak RSS "
        f"{mib(check['assemble_peak'])} MiB" if check["assemble_peak"] else "  (the cache was scored for real: --score)",
        f"  open_cache().read(train's columns): {check['read_s']:.1f} s; {check['token_ids']:,} reference token ids "
        f"= {mib(int32_bytes)} MiB as int32 (as Python lists: ~{mib(9 * int32_bytes)} MiB); the frame: "
        f"{mib(check['estimated_bytes'])} MiB (polars estimated_size), token ids as {check['dtypes']['ref_prompt_ids']}",
        f"  RSS {mib(check['imports_rss'])} MiB after the imports -> {mib(check['after_read_rss'])} after the read "
        f"(+{mib(check['after_read_rss'] - check['imports_rss'])}) -> {mib(check['after_split_rss'])} after "
        f"split_eval(rows, 0.05) (+{mib(check['after_split_rss'] - check['after_read_rss'])}); peak "
        f"{mib(check['read_peak'])} MiB"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
