"""The two scoring passes of `dadpo cache-teacher`, and the length rule they share.

A pass loads one model, scores the chosen and rejected responses of the pairs in some shards,
and writes one part file per shard (CACHE/work/<role>/NNNNN.parquet). Both passes tokenize
every pair with both tokenizers and apply the length rule to the longer side, so they keep
exactly the same pairs, and neither side is ever truncated.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from dadpo.cache import part_path, write_parquet_atomic
from dadpo.errors import DadpoError
from dadpo.modeling import ResolvedModel, load_tokenizer
from dadpo.pairs import prompt_messages
from dadpo.scoring import make_scorer
from dadpo.scoring.base import EngineOptions, ModelSpec
from dadpo.tokenization import tokenize_example


@dataclass
class Side:
    """One model as the passes need it: where it is and how to tokenize for it."""

    role: str  # teacher | reference
    flag: str  # --teacher | --reference
    name: str
    local_path: str
    revision: str | None
    chat: bool
    record: dict  # its manifest entry

    def resolved(self) -> ResolvedModel:
        return ResolvedModel(self.name, self.local_path, self.revision)


@dataclass
class ShardPlan:
    """What the length rule keeps of one shard: pair indices kept, ids dropped."""

    kept: list[int]
    dropped: list[str]


def tokenize_shard(rows: pl.DataFrame, tokenizers: dict, sides: dict, max_length: int | None,
                   on_overlong: str, pairs_source: str) -> tuple[ShardPlan, dict]:
    """Tokenize a shard's rows for both models and apply the length rule.

    Returns the plan and {role: [(prompt_ids, chosen_ids, rejected_ids)]} for the kept rows.
    """
    plan, tokens = ShardPlan([], []), {role: [] for role in sides}
    for pair_index, pair_id, prompt_json, chosen, rejected in rows.select(
        "pair_index", "id", "prompt", "chosen", "rejected"
    ).iter_rows():
        prompt = prompt_messages(prompt_json)
        per_role, longest = {}, {}
        for role, side in sides.items():
            where = f"{pairs_source} row id '{pair_id}' ({side.flag} {side.name})"
            prompt_ids, chosen_ids = tokenize_example(tokenizers[role], prompt, chosen, side.chat, where)
            _, rejected_ids = tokenize_example(tokenizers[role], prompt, rejected, side.chat, where)
            per_role[role] = (prompt_ids, chosen_ids, rejected_ids)
            longest[role] = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        role = max(longest, key=longest.get)
        if max_length is not None and longest[role] > max_length:
            if on_overlong == "error":
                raise DadpoError(
                    f"{pairs_source} row id '{pair_id}': {longest[role]} prompt+response tokens under the {role} "
                    f"tokenizer exceed --max-length {max_length} (pass --on-overlong drop to skip such pairs)"
                )
            plan.dropped.append(pair_id)
            continue
        plan.kept.append(pair_index)
        for role in sides:
            tokens[role].append(per_role[role])
    return plan, tokens


def plan_shards(pairs: pl.DataFrame, shards: list[int], shard_size: int, tokenizers: dict, sides: dict,
                max_length: int | None, on_overlong: str, pairs_source: str) -> dict[int, ShardPlan]:
    """Tokenize the pending shards once before any model loads: template failures and
    over-long pairs (with --on-overlong error) surface in seconds, not hours into a pass."""
    return {k: tokenize_shard(pairs.slice(k * shard_size, shard_size), tokenizers, sides, max_length,
                              on_overlong, pairs_source)[0] for k in shards}


@dataclass
class PassJob:
    role: str
    sides: dict  # role -> Side
    out: str
    pairs_file: str  # CACHE/work/pairs.parquet
    pairs_source: str  # the user's pairs path, for messages
    shards: list
    shard_size: int
    max_length: int | None
    on_overlong: str
    backend: str
    engine: EngineOptions
    trust_remote_code: bool
    progress: bool


def run_isolated(job: PassJob) -> dict:
    """Run a pass in a fresh process, so the device memory of one model is fully released
    before the next is loaded (vLLM does not give it all back in-process). The child skips
    interpreter teardown, where vLLM 0.32 sometimes aborts (dadpo.scoring.isolated)."""
    from dadpo.scoring.isolated import call_isolated

    return call_isolated(run_pass, job)


def run_pass(job: PassJob) -> dict:
    """Score job.shards under one model and write one part file per shard."""
    side = job.sides[job.role]
    tokenizers = {role: load_tokenizer(s.resolved(), job.trust_remote_code, s.flag) for role, s in job.sides.items()}
    pad_id = tokenizers[job.role].pad_token_id
    pad_id = tokenizers[job.role].eos_token_id if pad_id is None else pad_id
    spec = ModelSpec(side.local_path, side.revision, side.record["dtype"], job.trust_remote_code)
    engine = job.engine
    if job.backend == "vllm" and engine.max_model_len is None and job.max_length:
        # vLLM must leave room for one generated token
        engine = EngineOptions(**{**asdict(engine), "max_model_len": job.max_length + 1})
    pairs = pl.read_parquet(job.pairs_file)
    scorer = make_scorer(job.backend, spec, engine, side.resolved(), pad_id or 0)
    progress = Progress(f"{job.role} {side.name} [{job.backend}]", len(job.shards), job.progress)
    tokens_scored, started = 0, time.time()
    try:
        for k in job.shards:
            rows = pairs.slice(k * job.shard_size, job.shard_size)
            plan, tokens = tokenize_shard(rows, tokenizers, job.sides, job.max_length, job.on_overlong,
                                          job.pairs_source)
            own = tokens[job.role]
            sequences = [(p, c) for p, c, _ in own] + [(p, r) for p, _, r in own]
            scores = scorer.score(sequences, on_tokens=progress.tokens) if sequences else np.zeros(0)
            tokens_scored += sum(len(p) + len(r) for p, r in sequences)
            _refuse_non_finite(scores, plan.kept, rows, k, job.shard_size, side, job.pairs_source)
            write_parquet_atomic(_part_table(job.role, plan, own, scores), part_path(Path(job.out), job.role, k))
            progress.shard_done()
    finally:
        progress.close()
        scorer.close()
    seconds = time.time() - started
    return {"tokens": tokens_scored, "seconds": seconds, "tokens_per_s": tokens_scored / max(seconds, 1e-9)}


def _refuse_non_finite(scores: np.ndarray, kept: list[int], rows: pl.DataFrame, k: int, shard_size: int, side: Side,
                       pairs_source: str) -> None:
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        n = len(kept)  # scores hold the chosen sequences, then the rejected ones
        column = "chosen" if bad[0] < n else "rejected"
        pair_id = rows["id"][kept[bad[0] % n] - k * shard_size]
        raise DadpoError(
            f"{side.flag} {side.name}: log-prob of the {column} response is {scores[bad[0]]} for {pairs_source} "
            f"row id '{pair_id}' ({bad.size} non-finite in shard {k}); "
            "the weights or the --dtype are broken for this input, and the shard was not cached"
        )


def _part_table(role: str, plan: ShardPlan, own: list, scores: np.ndarray) -> pa.Table:
    n = len(plan.kept)
    columns = {
        "pair_index": pa.array(plan.kept, pa.int64()),
        "logp_chosen": pa.array(scores[:n], pa.float64()),
        "logp_rejected": pa.array(scores[n:], pa.float64()),
        "ntok_chosen": pa.array([len(c) for _, c, _ in own], pa.int32()),
        "ntok_rejected": pa.array([len(r) for _, _, r in own], pa.int32()),
    }
    if role == "reference":  # training reads the reference tokenization from the cache
        for i, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
            columns[name] = pa.array([ids[i] for ids in own], pa.list_(pa.int32()))
    return pa.table(columns)


class Progress:
    """A tqdm bar on an interactive terminal; elsewhere (logs, SLURM, pipes) a plain line on
    stdout at most every 30 s, so log files stay readable and stderr stays for errors."""

    def __init__(self, desc: str, num_shards: int, enabled: bool):
        self.desc, self.num_shards, self.done, self.num_tokens = desc, num_shards, 0, 0
        self.started = self.last_line = time.time()
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr, mininterval=1.0)

    def tokens(self, count: int) -> None:
        self.num_tokens += count
        if self.bar is not None:
            self.bar.update(count)

    def shard_done(self) -> None:
        self.done += 1
        now = time.time()
        if self.lines and now - self.last_line >= 30:
            self.last_line = now
            rate = self.num_tokens / max(now - self.started, 1e-9)
            print(f"{self.desc}: {self.done}/{self.num_shards} shards scored, {rate:.0f} tok/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
