"""`dadpo cache-teacher`: score every pair once under the teacher and the reference, into shards.

    pairs file --load_pairs--> work/pairs.parquet
        --teacher pass-->   work/teacher/NNNNN.parquet     (one model in memory)
        --reference pass--> work/reference/NNNNN.parquet   (the other, after the first is freed)
        --assemble-->       shards/shard-NNNNN-of-MMMMM.parquet + manifest.json entry

Shard k always holds pairs [k*shard_size, (k+1)*shard_size), and worker i of n owns the shards
with k % n == i, so any number of workers, runs and restarts produce the same files. Each step
skips what is already on disk; every file appears atomically. That makes a re-run after a crash
(or kill -9) continue where it stopped, with no pair lost or duplicated.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from dadpo.cache import WORK_DIR, part_path, shard_columns, shard_file, write_parquet_atomic
from dadpo.errors import DadpoError
from dadpo.manifest import (
    DROPPED_NAME,
    differences,
    locked,
    manifest_path,
    new_manifest,
    read_manifest,
    record_shard,
    write_json_atomic,
)
from dadpo.modeling import load_tokenizer, max_positions, resolve_model, resolved_dtype, torch_dtype, weights_digest
from dadpo.pairs import load_pairs, prompt_messages
from dadpo.scoring import backend_version, make_scorer, pick_backend
from dadpo.scoring.base import EngineOptions, ModelSpec
from dadpo.tokenization import tokenize_example, tokenizer_digest, uses_chat_template

ROLES = ("teacher", "reference")


@dataclass
class CacheTeacherConfig:
    pairs: str
    teacher: str
    reference: str
    out: str
    backend: str = "auto"
    dtype: str = "auto"
    teacher_revision: str | None = None
    reference_revision: str | None = None
    max_length: int | None = None  # prompt+response, both sides; None: the models' own limit
    on_overlong: str = "drop"  # drop | error
    shard_size: int = 1000
    num_workers: int = 1
    worker_index: int = 0
    overwrite: bool = False
    no_chat_template: bool = False
    trust_remote_code: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    progress: bool = True


@dataclass
class CacheSummary:
    path: str
    rows: int
    dropped: int
    shards_done: int
    num_shards: int
    complete: bool
    seconds: float
    pass_stats: dict


@dataclass
class _Side:
    """One model as the passes need it: where it is and how to tokenize for it."""

    role: str
    name: str
    local_path: str
    revision: str | None
    chat: bool
    record: dict  # its manifest entry


def cache_teacher(cfg: CacheTeacherConfig) -> CacheSummary:
    started = time.time()
    _check_flags(cfg)
    out = _prepare_out(cfg.out)
    pairs = load_pairs(cfg.pairs)
    backend = pick_backend(cfg.backend)
    sides = {
        "teacher": _describe(cfg, "teacher", cfg.teacher, cfg.teacher_revision, backend),
        "reference": _describe(cfg, "reference", cfg.reference, cfg.reference_revision, backend),
    }
    max_length = cfg.max_length or _models_limit(sides)
    num_shards = math.ceil(len(pairs) / cfg.shard_size)
    header = {
        "pairs": {"source": str(cfg.pairs), "fingerprint": pairs.fingerprint, "rows": len(pairs),
                  "extra_columns": pairs.extra_columns},
        "length_rule": {"max_length": max_length, "applies_to": "prompt+response tokens, teacher and reference",
                        "on_overlong": cfg.on_overlong},
        "shard_size": cfg.shard_size,
        "num_shards": num_shards,
        "teacher": sides["teacher"].record,
        "reference": sides["reference"].record,
    }
    manifest = _open_or_create(out, header, cfg.overwrite)
    pairs_file = out / WORK_DIR / "pairs.parquet"
    if not pairs_file.exists():
        write_parquet_atomic(pairs.frame.with_row_index("pair_index").to_arrow(), pairs_file)
    done = {s["index"] for s in manifest["shards"]}
    mine = [k for k in range(num_shards) if k % cfg.num_workers == cfg.worker_index and k not in done]

    pass_stats = {}
    for role in ROLES:
        todo = [k for k in mine if not part_path(out, role, k).exists()]
        if todo:
            job = _PassJob(role, sides, str(out), str(pairs_file), todo, max_length, cfg, backend)
            pass_stats[role] = _run_isolated(job) if backend == "vllm" else run_pass(job)
    for k in mine:
        manifest = _assemble(out, k, num_shards, cfg.shard_size)
    manifest = read_manifest(out)
    if manifest["complete"]:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return CacheSummary(str(out), manifest["totals"]["rows"], manifest["totals"]["dropped"],
                        manifest["totals"]["shards_done"], num_shards, manifest["complete"],
                        time.time() - started, pass_stats)


def _check_flags(cfg: CacheTeacherConfig) -> None:
    if cfg.on_overlong not in ("drop", "error"):
        raise DadpoError(f"--on-overlong {cfg.on_overlong}: choose drop or error")
    if cfg.shard_size < 1:
        raise DadpoError(f"--shard-size {cfg.shard_size}: must be at least 1")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise DadpoError(f"--max-length {cfg.max_length}: must be at least 2")
    if cfg.num_workers < 1 or not 0 <= cfg.worker_index < cfg.num_workers:
        raise DadpoError(f"--worker-index {cfg.worker_index}: must be in 0..{cfg.num_workers - 1} (--num-workers {cfg.num_workers})")
    if cfg.engine.batch_size < 1:
        raise DadpoError(f"--batch-size {cfg.engine.batch_size}: must be at least 1")
    torch_dtype(cfg.dtype)


def _prepare_out(out: str) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DadpoError(f"--out {out}: is a file, expected a folder for the cache")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{id(folder)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DadpoError(f"--out {out}: cannot write there ({exc.strerror or exc})")
    return folder


def _describe(cfg: CacheTeacherConfig, role: str, name: str, revision: str | None, backend: str) -> _Side:
    flag = f"--{role}"
    resolved = resolve_model(name, revision, flag)
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code, flag)
    chat = uses_chat_template(tokenizer, cfg.no_chat_template)
    record = {
        "model": name,
        "revision": resolved.revision,
        "weights_digest": weights_digest(resolved),
        "tokenizer_digest": tokenizer_digest(tokenizer, chat),
        "chat_template": chat,
        "dtype": resolved_dtype(resolved, cfg.dtype),
        "backend": backend,
        "backend_version": backend_version(backend),
        "fp32_head": cfg.engine.fp32_head,
    }
    return _Side(role, name, resolved.local_path, resolved.revision, chat, record)


def _models_limit(sides: dict) -> int | None:
    limits = [max_positions(resolve_model(s.local_path)) for s in sides.values()]
    limits = [n for n in limits if n]
    return min(limits) if limits else None


def _open_or_create(out: Path, header: dict, overwrite: bool) -> dict:
    with locked(out):
        existing = read_manifest(out)
        if existing is not None and overwrite:
            for name in ("shards", WORK_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / DROPPED_NAME).unlink(missing_ok=True)
            manifest_path(out).unlink()
            existing = None
        if existing is None:
            if (out / "shards").exists() or (out / WORK_DIR).exists():
                raise DadpoError(f"--out {out}: holds cache files but no manifest.json; pass --overwrite to start over")
            manifest = new_manifest(header)
            write_json_atomic(manifest_path(out), manifest)
            return manifest
        changed = differences(existing, new_manifest(header))
        if changed:
            raise DadpoError(
                f"--out {out}: the cache there was made with different settings: {'; '.join(changed)}. "
                "Pass --overwrite to start over, or choose another --out"
            )
        return existing


# ---- the scoring passes -------------------------------------------------------------------


@dataclass
class _PassJob:
    role: str
    sides: dict
    out: str
    pairs_file: str
    shards: list
    max_length: int | None
    cfg: CacheTeacherConfig
    backend: str


def _run_isolated(job: _PassJob) -> dict:
    """Run a pass in a fresh process, so the device memory of one model is fully released
    before the next is loaded (vLLM does not give it all back in-process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_pass, job).result()


def tokenize_shard(rows: pl.DataFrame, tokenizers: dict, sides: dict, max_length: int | None,
                   on_overlong: str, pairs_source: str) -> tuple[list[int], list[str], dict]:
    """Tokenize a shard's rows for both models and apply the length rule.

    Returns (kept pair indices, dropped ids, {role: [(prompt_ids, chosen_ids, rejected_ids)]})
    for the kept rows. Both passes call this with both tokenizers, so they agree on what is kept.
    """
    kept, dropped, tokens = [], [], {role: [] for role in sides}
    for pair_index, pair_id, prompt_json, chosen, rejected in rows.select(
        "pair_index", "id", "prompt", "chosen", "rejected"
    ).iter_rows():
        prompt = prompt_messages(prompt_json)
        per_role, longest = {}, 0
        for role, side in sides.items():
            where = f"{pairs_source} row id '{pair_id}' ({role} {side.name})"
            prompt_ids, chosen_ids = tokenize_example(tokenizers[role], prompt, chosen, side.chat, where)
            _, rejected_ids = tokenize_example(tokenizers[role], prompt, rejected, side.chat, where)
            per_role[role] = (prompt_ids, chosen_ids, rejected_ids)
            longest = max(longest, len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)))
        if max_length is not None and longest > max_length:
            if on_overlong == "error":
                raise DadpoError(f"{pairs_source} row id '{pair_id}': {longest} tokens exceed --max-length {max_length} "
                                 "(pass --on-overlong drop to skip such pairs)")
            dropped.append(pair_id)
            continue
        kept.append(pair_index)
        for role in sides:
            tokens[role].append(per_role[role])
    return kept, dropped, tokens


def run_pass(job: _PassJob) -> dict:
    """Score job.shards under one model and write one part file per shard."""
    from tqdm import tqdm

    from dadpo.modeling import ResolvedModel

    cfg, side = job.cfg, job.sides[job.role]
    tokenizers = {role: load_tokenizer(ResolvedModel(s.name, s.local_path, s.revision), cfg.trust_remote_code)
                  for role, s in job.sides.items()}
    pad_id = tokenizers[job.role].pad_token_id
    pad_id = tokenizers[job.role].eos_token_id if pad_id is None else pad_id
    spec = ModelSpec(side.local_path, side.revision, side.record["dtype"], cfg.trust_remote_code)
    engine = cfg.engine
    if job.backend == "vllm" and engine.max_model_len is None and job.max_length:
        engine = EngineOptions(**{**asdict(engine), "max_model_len": job.max_length})
    pairs = pl.read_parquet(job.pairs_file)
    scorer = make_scorer(job.backend, spec, engine, ResolvedModel(side.name, side.local_path, side.revision), pad_id or 0)
    bar = tqdm(desc=f"{job.role} {side.name} [{job.backend}]", unit="tok", unit_scale=True,
               disable=not cfg.progress, file=sys.stderr, mininterval=1.0)
    tokens_scored, started = 0, time.time()
    try:
        for k in job.shards:
            rows = pairs.slice(k * cfg.shard_size, cfg.shard_size)
            kept, dropped, tokens = tokenize_shard(rows, tokenizers, job.sides, job.max_length,
                                                   cfg.on_overlong, cfg.pairs)
            own = tokens[job.role]
            sequences = [(p, c) for p, c, _ in own] + [(p, r) for p, _, r in own]
            scores = scorer.score(sequences, on_tokens=bar.update) if sequences else np.zeros(0)
            tokens_scored += sum(len(p) + len(r) for p, r in sequences)
            bad = np.flatnonzero(~np.isfinite(scores))
            if bad.size:
                pair_index = kept[bad[0] % len(kept)]  # scores hold chosen then rejected
                pair_id = rows["id"][pair_index - k * cfg.shard_size]
                raise DadpoError(f"{job.role} {side.name}: non-finite log-prob for pair id '{pair_id}'; "
                                 "the model or its dtype is broken for this input")
            n = len(kept)
            columns = {
                "pair_index": pa.array(kept, pa.int64()),
                "logp_chosen": pa.array(scores[:n], pa.float64()),
                "logp_rejected": pa.array(scores[n:], pa.float64()),
                "ntok_chosen": pa.array([len(c) for _, c, _ in own], pa.int32()),
                "ntok_rejected": pa.array([len(r) for _, _, r in own], pa.int32()),
            }
            if job.role == "reference":  # training reads the reference tokenization from the cache
                for i, name in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
                    columns[name] = pa.array([ids[i] for ids in own], pa.list_(pa.int32()))
            table = pa.table(columns).replace_schema_metadata({"dropped_ids": "\n".join(dropped)})
            write_parquet_atomic(table, part_path(Path(job.out), job.role, k))
    finally:
        bar.close()
        scorer.close()
    seconds = time.time() - started
    return {"tokens": tokens_scored, "seconds": seconds, "tokens_per_s": tokens_scored / max(seconds, 1e-9)}


def _assemble(out: Path, k: int, num_shards: int, shard_size: int) -> dict:
    """Join the pair rows with both passes' results into the final shard; record it."""
    import pyarrow.parquet as pq

    teacher_part = pq.read_table(part_path(out, "teacher", k))
    reference_part = pq.read_table(part_path(out, "reference", k))
    if teacher_part["pair_index"] != reference_part["pair_index"]:
        raise DadpoError(f"{out}: shard {k}: the teacher and reference passes kept different pairs; "
                         "re-run with --overwrite")
    pairs = pl.read_parquet(out / WORK_DIR / "pairs.parquet").slice(k * shard_size, shard_size)
    rows = pairs.join(pl.from_arrow(teacher_part.select(["pair_index"])), on="pair_index", how="semi")
    renamed = {}
    for prefix, part in (("teacher", teacher_part), ("ref", reference_part)):
        for name in part.column_names:
            if name != "pair_index":
                renamed[f"{prefix}_{name}"] = part[name]
    fixed = shard_columns()
    columns = {name: rows[name].to_arrow() if name in rows.columns else renamed[name] for name in fixed}
    table = pa.table({name: columns[name].cast(fixed[name]) for name in fixed})
    for extra in rows.columns:
        if extra not in fixed:
            table = table.append_column(extra, rows[extra].to_arrow())
    file = shard_file(k, num_shards)
    digest = write_parquet_atomic(table, out / file)
    dropped = teacher_part.schema.metadata.get(b"dropped_ids", b"").decode()
    entry = {"index": k, "file": file, "rows": table.num_rows,
             "pair_range": [k * shard_size, k * shard_size + pairs.height], "sha256": digest,
             "dropped_ids": [d for d in dropped.split("\n") if d]}
    manifest = record_shard(out, entry)
    for role in ROLES:
        part_path(out, role, k).unlink(missing_ok=True)
    return manifest
