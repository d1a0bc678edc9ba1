"""What cache-teacher does to each pair: tokenize it once for every model (the plan), then score it
under one model per pass.

    plan_shards  each shard's pairs -> every model's (prompt, chosen, rejected) ids by the one rule
                 (dadpo.tokenization), the length rule applied to the longest side: a pair over it
                 under any model is dropped whole, never truncated -> CACHE/work/tokens/NNNNN.parquet;
                 shards are tokenized in forked worker processes (one per CPU, at most 8)
    run_pass     one model over its pending shards: read the ids, take any score --reuse-from
                 already holds, score the rest (hf, vllm or a server) -> CACHE/work/<model>/NNNNN.parquet

Each shard's files are published whole; a pass stops after the shard in flight on a stop signal.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
import warnings
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo import stop
from dadpo.atomic import write_parquet_atomic
from dadpo.cache.layout import REFERENCE, shard_file, teacher_prefix, work_path
from dadpo.cache.manifest import model_records, read_manifest, reuse_identity
from dadpo.engine import EngineOptions
from dadpo.errors import DadpoError, first_line
from dadpo.modeling import ResolvedModel, model_tokenizer
from dadpo.pairs import decode_prompt
from dadpo.pairs_rows import RESPONSE_COLUMNS, SIDES
from dadpo.runner import Progress
from dadpo.tokenization import ModelTokenizer, length_rule, pair_responses

_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class Side:
    """One model as the passes need it: where it is, how it tokenizes, what the manifest records."""

    role: str  # reference | teacher | teacher:NAME
    prefix: str  # its shard columns: ref_* | teacher_* | teacher_NAME_*
    flag: str  # how messages name it: --reference, --teacher, --teacher NAME
    name: str  # the model as given (hub id or folder)
    local_path: str  # the folder with its tokenizer (and weights, unless it is served)
    revision: str | None
    chat: bool
    template_kwargs: dict
    template_date: str | None
    record: dict  # its manifest entry
    url: str | None = None  # scored through this OpenAI-compatible server instead of loaded
    api_key: str | None = field(default=None, repr=False)  # that server's key (never shown)
    key_source: str | None = None  # where the key came from ($VAR), or the flag that gives one

    def tokenizer(self, trust_remote_code: bool) -> ModelTokenizer:
        """Loaded once per process (the plan and a pass in the same process share it)."""
        key = json.dumps([self.local_path, self.flag, self.chat, self.template_kwargs, self.template_date,
                          trust_remote_code], sort_keys=True, default=str)
        if key not in _LOADED:
            _LOADED[key] = model_tokenizer(ResolvedModel(self.name, self.local_path, self.revision), self.flag,
                                           no_chat_template=not self.chat, template_kwargs=self.template_kwargs,
                                           template_date=self.template_date, trust_remote_code=trust_remote_code)
        return _LOADED[key]


_LOADED: dict[str, ModelTokenizer] = {}


def sequence_key(prompt_ids, response_ids) -> int:
    """64 bits naming a scored sequence: the prompt ids and the response ids (their boundary included)."""
    data = np.asarray([len(prompt_ids), *prompt_ids, *response_ids], dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------- the plan


@dataclass
class PlannedShard:
    """One shard's plan as plain Python (what a plan worker sends back): the kept pairs, every model's
    ids flat (4 bytes a token: a Python list of ints would take 36), and the ids of the pairs dropped."""

    pair_index: list[int]
    ids: list[str]
    dropped: list[str]
    tokens: dict[str, tuple[array, array]]  # column -> (offsets, values), int32

    def table(self) -> pa.Table:
        """pair_index, id, then PREFIX_prompt_ids/chosen_ids/rejected_ids per model."""
        columns = {"pair_index": pa.array(self.pair_index, pa.int64()), "id": pa.array(self.ids, pa.string())}
        for column, (offsets, values) in self.tokens.items():
            columns[column] = pa.ListArray.from_arrays(pa.array(np.frombuffer(offsets, np.int32)),
                                                       pa.array(np.frombuffer(values, np.int32)))
        return pa.table(columns)


PLAN_COLUMNS = ("pair_index", "id", "prompt", *SIDES, *RESPONSE_COLUMNS)  # what tokenize_shard reads of a row


def tokenize_shard(rows: Iterable[dict], tokenizers: dict[str, ModelTokenizer], flags: dict[str, str],
                   max_length: int | None, on_overlong: str, source: str) -> PlannedShard:
    """Tokenize a shard's pairs (dicts of the normalised columns, with pair_index) for every model;
    apply the length rule to the longest side: a pair over it under any model is dropped whole."""
    kept, kept_ids, dropped = [], [], []
    tokens = {f"{prefix}_{name}": (array("i", [0]), array("i")) for prefix in tokenizers for name in _IDS}
    for row in rows:
        prompt, (chosen, rejected) = decode_prompt(row["prompt"]), pair_responses(row)
        encoded, longest = {}, (0, "")
        for prefix, tokenizer in tokenizers.items():
            where = f"{source} row id '{row['id']}' ({flags[prefix]} {tokenizer.name.split(' ', 1)[-1]})"
            encoded[prefix] = tokenizer.encode_pair(prompt, chosen, rejected, where)
            p, c, r = encoded[prefix]
            longest = max(longest, (len(p) + max(len(c), len(r)), prefix))
        under = flags[longest[1]].removeprefix("--")
        if length_rule(longest[0], max_length, on_overlong, f"{source} row id '{row['id']}' (under the {under} "
                                                              "tokenizer)"):
            dropped.append(row["id"])
            continue
        kept.append(row["pair_index"])
        kept_ids.append(row["id"])
        for prefix, triple in encoded.items():
            for name, value in zip(_IDS, triple):
                offsets, values = tokens[f"{prefix}_{name}"]
                values.extend(value)
                offsets.append(len(values))
    return PlannedShard(kept, kept_ids, dropped, tokens)


def plan_shards(shards: list[int], read_rows: Callable[[int], list[dict]], write: Callable[[int, PlannedShard], None],
                tokenizers: dict[str, ModelTokenizer], flags: dict[str, str], max_length: int | None,
                on_overlong: str, source: str, workers: int = 0, progress: bool = False) -> None:
    """tokenize_shard over each shard's rows (read_rows(k): dicts of PLAN_COLUMNS), then write(k, plan),
    in shard order. The tokenizing runs in `workers` forked processes (0: one per CPU, at most 8), a
    bounded window of shards ahead, while this process reads rows and writes files: the workers
    inherit the loaded tokenizers and only tokenize (never polars, whose thread pool does not survive
    a fork, and never a file). The first failing shard in order raises its error, as one process would.
    A stop signal ends the plan after the shard in flight, raising stop.Stopped (the caller keeps
    nothing of an unfinished plan)."""
    bar = Progress("plan", len(shards), "shard", progress)
    tokenized = _tokenized(shards, read_rows, (tokenizers, flags, max_length, on_overlong, source), workers)
    with contextlib.closing(tokenized):  # closing it ends the workers, after the shards they hold
        try:
            for k, planned in bar.each(tokenized):
                bar.tokens(sum(len(values) for _, values in planned.tokens.values()))
                write(k, planned)
        finally:
            bar.close()
    if bar.done < len(shards):
        raise stop.Stopped(f"stopped by {stop.requested()} while tokenizing the pairs ({bar.done} of {len(shards)} "
                           "shards): nothing was cached yet", "re-run the same command to plan again")


def _tokenized(shards: list[int], read_rows: Callable[[int], list[dict]], args: tuple, workers: int):
    """(k, tokenize_shard(read_rows(k), *args)) for each shard in order, tokenized in forked workers."""
    workers = _plan_workers(workers, len(shards))
    if workers <= 1:
        for k in shards:
            yield k, tokenize_shard(read_rows(k), *args)
        return
    global _PLAN_ARGS
    _PLAN_ARGS, pending, source = args, deque(), args[-1]
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                                   initargs=(os.getpid(),))
    try:
        for k in shards:
            rows = read_rows(k)
            with _forking(k == shards[0]):  # the first submit forks the workers
                pending.append((k, executor.submit(_tokenize_in_worker, rows)))
            if len(pending) > 2 * workers:  # rows of a few shards wait in memory, never the whole file
                done, future = pending.popleft()
                yield done, _worker_result(future, source)
        while pending:
            done, future = pending.popleft()
            yield done, _worker_result(future, source)
    finally:
        _PLAN_ARGS = None
        executor.shutdown(wait=True, cancel_futures=True)  # after an error or a stop: drop what has not started


_PLAN_ARGS: tuple | None = None  # what plan workers tokenize with: inherited through the fork, never pickled
MAX_PLAN_WORKERS = 8


def _plan_workers(requested: int, shards: int) -> int:
    if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
        return 1  # no fork here (Windows), or a daemonic process, which may not have children
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(requested or min(cpus, MAX_PLAN_WORKERS), shards)


def _tokenize_in_worker(rows: list[dict]) -> PlannedShard:
    return tokenize_shard(rows, *_PLAN_ARGS)


def _start_worker(parent: int) -> None:
    # The Rust tokenizers' thread pool does not survive a fork: each worker tokenizes on its one thread.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C and the stop signals reach the whole process group: the parent alone decides (it ends the
    # plan after the shard in flight), so a worker neither dies mid-shard nor prints a traceback.
    for sig in (signal.SIGINT, *stop.SIGNALS):
        signal.signal(sig, signal.SIG_IGN)

    def exit_when_orphaned() -> None:  # the parent was killed (kill -9): do not wait for work forever
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


@contextlib.contextmanager
def _forking(now: bool):
    """Around the fork of the plan workers: TOKENIZERS_PARALLELISM set, so the tokenizers library does
    not warn about the fork; every object so far frozen out of the garbage collector, so a worker's
    collections do not write to (and so copy) the pages it shares with this process (~100 MB each)."""
    if not now:
        yield
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    gc.freeze()
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns of any fork beside threads; the workers only tokenize
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            yield
    finally:
        gc.unfreeze()
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _worker_result(future, source: str) -> PlannedShard:
    try:
        return future.result()
    except BrokenProcessPool:
        raise DadpoError(f"{source}: a process tokenizing the plan died (killed, or out of memory?); nothing was "
                         "cached, re-run the command") from None


# ---------------------------------------------------------------- a pass


@dataclass
class PassJob:
    side: Side
    out: str
    shards: list[int]
    backend: str
    engine: EngineOptions
    max_length: int | None
    trust_remote_code: bool
    progress: bool
    reuse_from: list[str] = field(default_factory=list)
    server: dict = field(default_factory=dict, repr=False)  # ServerScorer settings (its key too) for a served model
    source: str = ""  # the pairs file, for messages

    @property
    def role(self) -> str:
        return self.side.role


def run_pass(job: PassJob) -> dict:
    """Score job.shards under one model and write one part file per shard. Returns its stats."""
    from dadpo.scoring import make_scorer

    side, out = job.side, Path(job.out)
    reuse = ReuseIndex(job.reuse_from, side.record)
    scorer = make_scorer(job, side)
    progress = Progress(f"{side.role} {side.name} [{side.record['backend']}]", len(job.shards), "shard", job.progress)
    scored = reused = tokens = 0
    try:
        for k in progress.each(job.shards):
            table = pq.read_table(work_path(out, "tokens", k),
                                  columns=["pair_index", "id"] + [f"{side.prefix}_{n}" for n in _IDS])
            prompts, chosen, rejected = (table[f"{side.prefix}_{n}"].to_pylist() for n in _IDS)
            keys = np.array([[sequence_key(p, c), sequence_key(p, r)] for p, c, r in zip(prompts, chosen, rejected)],
                            dtype=np.int64).reshape(-1, 2)
            logps = reuse.lookup(keys)  # NaN where not cached before
            missing = np.isnan(logps)
            both = np.flatnonzero(missing.all(axis=1))  # a pair's prompt computed once for both responses
            if both.size:
                triples = [(prompts[i], chosen[i], rejected[i]) for i in both]
                logps[both, 0], logps[both, 1] = scorer.score_pairs(triples, on_tokens=progress.tokens)
            single = [(i, which) for i, which in np.argwhere(missing & ~missing.all(axis=1, keepdims=True))]
            if single:  # e.g. a new student response to a prompt whose teacher response was scored before
                responses = (chosen, rejected)
                scores = scorer.score([(prompts[i], responses[which][i]) for i, which in single],
                                      on_tokens=progress.tokens)
                for (i, which), score in zip(single, scores):
                    logps[i, which] = score
            num_scored = int(missing.sum())
            _refuse_non_finite(logps, table["id"].to_pylist(), k, side, job.source)
            part = pa.table({
                "pair_index": table["pair_index"],
                "logp_chosen": pa.array(logps[:, 0], pa.float64()), "logp_rejected": pa.array(logps[:, 1], pa.float64()),
                "ntok_chosen": pa.array([len(c) for c in chosen], pa.int32()),
                "ntok_rejected": pa.array([len(r) for r in rejected], pa.int32()),
                "key_chosen": pa.array(keys[:, 0], pa.int64()), "key_rejected": pa.array(keys[:, 1], pa.int64()),
            })
            counts = {"scored": str(num_scored), "reused": str(missing.size - num_scored)}
            write_parquet_atomic(part, work_path(out, side.prefix, k), metadata=counts)
            scored, reused = scored + num_scored, reused + missing.size - num_scored
            tokens += sum(len(prompts[i]) + len((chosen, rejected)[which][i]) for i, which in np.argwhere(missing))
    finally:
        progress.close()
        scorer.close()
    return {**progress.stats(tokens), "sequences_scored": scored, "sequences_reused": reused,
            "shared_prompt_tokens": getattr(scorer, "shared_prompt_tokens", 0)}


def _refuse_non_finite(logps: np.ndarray, ids: list[str], k: int, side: Side, source: str) -> None:
    bad = np.argwhere(~np.isfinite(logps))
    if bad.size:
        row, column = bad[0]
        raise DadpoError(f"{side.flag} {side.name}: log-prob of the {'chosen' if column == 0 else 'rejected'} response "
                         f"is {logps[row, column]} for {source} row id '{ids[row]}' ({len(bad)} non-finite in "
                         f"shard {k}); the weights or the --dtype are broken for this input, and the shard was not "
                         "cached")


class ReuseIndex:
    """Scores of earlier caches (--reuse-from) for one model, looked up by sequence key: a model
    matches when its weights and how they ran (reuse_identity) are the same."""

    def __init__(self, caches: list[str], record: dict):
        keys, logps = [], []
        want = reuse_identity(record)
        for cache in caches:
            manifest = read_manifest(Path(cache))
            if manifest is None or manifest["schema_version"] < 2:
                continue  # the caller refused these up front; schema 1 shards have no keys
            for role, old in model_records(manifest).items():
                if reuse_identity(old) != want:
                    continue
                prefix = REFERENCE if role == "reference" else teacher_prefix(role.partition(":")[2])
                for entry in manifest["shards"]:
                    file = Path(cache) / shard_file(entry["index"], manifest["num_shards"])
                    try:  # verified when the run started (cache-teacher's flag checks)
                        part = pq.read_table(file, columns=[f"{prefix}_{kind}_{side}" for kind in ("key", "logp")
                                                            for side in ("chosen", "rejected")])
                    except (pa.ArrowException, OSError) as exc:
                        raise DadpoError(f"--reuse-from {cache}: {file}: unreadable ({first_line(exc)})") from None
                    for side in ("chosen", "rejected"):
                        keys.append(part[f"{prefix}_key_{side}"].to_numpy())
                        logps.append(part[f"{prefix}_logp_{side}"].to_numpy())
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        self.logps = np.concatenate(logps) if logps else np.zeros(0, np.float64)
        order = np.argsort(self.keys, kind="stable")
        self.keys, self.logps = self.keys[order], self.logps[order]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Cached log-probs for an [n, 2] key array; NaN where a key is not cached."""
        result = np.full(keys.shape, np.nan)
        if self.keys.size:
            where = np.searchsorted(self.keys, keys).clip(max=self.keys.size - 1)
            found = self.keys[where] == keys
            result[found] = self.logps[where[found]]
        return result
