"""`dadpo cache-teacher`: score every pair once under the teacher and the reference, into shards.

    pairs file --load_pairs--> checks, fingerprint
        --plan-->           tokenize pending shards with both tokenizers, apply the length rule
        --teacher pass-->   work/teacher/NNNNN.parquet     (one model in memory; dadpo.cache_passes)
        --reference pass--> work/reference/NNNNN.parquet   (the other, after the first is freed)
        --assemble-->       shards/shard-NNNNN-of-MMMMM.parquet + manifest.json entry

Shard k always holds pairs [k*shard_size, (k+1)*shard_size), and worker i of n owns the shards
with k % n == i, so any number of workers, runs and restarts produce the same files. Each step
skips what is already on disk, and every file appears atomically (dadpo.atomic). A re-run after
a crash (or kill -9) therefore continues where it stopped, with no pair lost or duplicated: it
adopts a shard written just before the crash but not yet recorded (after checking it holds
exactly the pairs it should), recomputes a recorded shard whose file no longer matches its
checksum, and clears temporary files that dead writers left behind.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.atomic import sweep_temp_files, write_json_atomic
from dadpo.cache import WORK_DIR, check_shard, part_path, shard_columns, shard_file, sha256_file, write_parquet_atomic
from dadpo.cache_passes import PassJob, ShardPlan, Side, plan_shards, run_isolated, run_pass
from dadpo.errors import DadpoError
from dadpo.manifest import (
    DROPPED_NAME,
    differences,
    forget_shard,
    locked,
    manifest_path,
    new_manifest,
    read_manifest,
    record_shard,
    write_dropped_ids,
)
from dadpo.modeling import (
    ResolvedModel,
    check_dtype,
    check_model_folder,
    load_tokenizer,
    max_positions,
    resolve_model,
    resolved_dtype,
    weights_digest,
)
from dadpo.pairs import load_pairs
from dadpo.scoring import BACKENDS, backend_version, pick_backend
from dadpo.scoring.base import EngineOptions
from dadpo.tokenization import tokenizer_digest, uses_chat_template

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
    adopted: int = 0  # shards found whole on disk but unrecorded (a crash in between), now recorded
    repaired: int = 0  # recorded shards whose file failed its checksum, recomputed


def cache_teacher(cfg: CacheTeacherConfig) -> CacheSummary:
    started = time.time()
    _check_flags(cfg)
    out, created = _prepare_out(cfg.out)
    try:
        return _cache_teacher(cfg, out, started)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no trace
        raise


def _cache_teacher(cfg: CacheTeacherConfig, out: Path, started: float) -> CacheSummary:
    pairs = load_pairs(cfg.pairs)
    existing = None if cfg.overwrite else _read_existing(out)
    backend = pick_backend(cfg.backend)
    resolved = {}  # the cheap model checks first, so a typo is refused in a second
    for role, name, revision in (("teacher", cfg.teacher, cfg.teacher_revision),
                                 ("reference", cfg.reference, cfg.reference_revision)):
        resolved[role] = resolve_model(name, revision, f"--{role}")
        check_model_folder(resolved[role], cfg.trust_remote_code, f"--{role}")
    max_length = _length_limit(cfg.max_length, resolved, backend)
    sides, tokenizers = {}, {}
    for role, model in resolved.items():
        sides[role], tokenizers[role] = _describe(cfg, role, model, backend)
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
    if existing is not None:
        _refuse_differences(out, existing, header)  # early, before the tokenization below
    recorded = {s["index"] for s in existing["shards"]} if existing else set()
    mine = [k for k in range(num_shards) if k % cfg.num_workers == cfg.worker_index]
    rows = pairs.frame.with_row_index("pair_index")
    # Nothing is written, and no model loaded, until every pending pair tokenizes cleanly.
    plans = plan_shards(rows, [k for k in mine if k not in recorded], cfg.shard_size, tokenizers, sides,
                        max_length, cfg.on_overlong, cfg.pairs)

    manifest = _open_or_create(out, header, cfg.overwrite)
    recorded = {s["index"] for s in manifest["shards"]}  # again: another process may have recorded some since
    plans = {k: plan for k, plan in plans.items() if k not in recorded}
    sweep_temp_files(out)
    pairs_file = out / WORK_DIR / "pairs.parquet"
    if not pairs_file.exists():
        write_parquet_atomic(rows.to_arrow(), pairs_file)
    repaired = _recheck_recorded(out, manifest, mine)
    for k in repaired:
        plans[k] = plan_shards(rows, [k], cfg.shard_size, tokenizers, sides, max_length, cfg.on_overlong,
                               cfg.pairs)[k]
    adopted = [k for k in sorted(plans) if _adopt(out, k, num_shards, cfg.shard_size, rows, plans[k])]
    todo = [k for k in sorted(plans) if k not in adopted]

    pass_stats = {}
    for role in ROLES:
        pending = [k for k in todo if not part_path(out, role, k).exists()]
        if pending:
            job = PassJob(role, sides, str(out), str(pairs_file), str(cfg.pairs), pending, cfg.shard_size,
                          max_length, cfg.on_overlong, backend, cfg.engine, cfg.trust_remote_code, cfg.progress)
            pass_stats[role] = run_isolated(job) if backend == "vllm" else run_pass(job)
    for k in todo:
        _assemble(out, k, num_shards, cfg.shard_size, rows, plans[k])
    manifest = _finish(out)
    totals = manifest["totals"]
    return CacheSummary(str(out), totals["rows"], totals["dropped"], totals["shards_done"], num_shards,
                        manifest["complete"], time.time() - started, pass_stats, len(adopted), len(repaired))


def _check_flags(cfg: CacheTeacherConfig) -> None:
    # Only cheap checks here (no torch import): a mistyped flag is refused in well under a second.
    if cfg.backend not in BACKENDS:
        raise DadpoError(f"--backend {cfg.backend}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if cfg.on_overlong not in ("drop", "error"):
        raise DadpoError(f"--on-overlong {cfg.on_overlong}: choose drop or error")
    if cfg.shard_size < 1:
        raise DadpoError(f"--shard-size {cfg.shard_size}: must be at least 1")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise DadpoError(f"--max-length {cfg.max_length}: must be at least 2")
    if cfg.num_workers < 1:
        raise DadpoError(f"--num-workers {cfg.num_workers}: must be at least 1")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise DadpoError(f"--worker-index {cfg.worker_index}: must be in 0..{cfg.num_workers - 1} "
                         f"(--num-workers {cfg.num_workers})")
    if cfg.engine.batch_size < 1:
        raise DadpoError(f"--batch-size {cfg.engine.batch_size}: must be at least 1")
    check_dtype(cfg.dtype)


def _prepare_out(out: str) -> tuple[Path, bool]:
    """The cache folder, created if needed and proven writable. Returns (folder, created)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DadpoError(f"--out {out}: is a file, expected a folder for the cache")
    created = not folder.exists()
    if not created:
        _refuse_foreign(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise DadpoError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return folder, created


def _refuse_foreign(folder: Path) -> None:
    # dadpo writes the manifest before anything else, so shards/ or work/ without one are not
    # a dadpo cache's: never write into (or, with --overwrite, delete) someone else's files.
    # (Folders first, manifest second: a worker starting right now cannot make this misfire.)
    foreign = [f"{name}/" for name in ("shards", WORK_DIR) if (folder / name).exists()]
    if foreign and not manifest_path(folder).exists():
        raise DadpoError(f"--out {folder}: holds {' and '.join(foreign)} but no manifest.json, so it is not a "
                         "dadpo cache; choose another --out")


def _describe(cfg: CacheTeacherConfig, role: str, resolved: ResolvedModel, backend: str):
    flag = f"--{role}"
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code, flag)
    chat = uses_chat_template(tokenizer, cfg.no_chat_template)
    record = {
        "model": resolved.record_name,
        "revision": resolved.revision,
        "weights_digest": weights_digest(resolved),
        "tokenizer_digest": tokenizer_digest(tokenizer, chat),
        "chat_template": chat,
        "dtype": resolved_dtype(resolved, cfg.dtype),
        "backend": backend,
        "backend_version": backend_version(backend),
        "fp32_head": cfg.engine.fp32_head,
    }
    return Side(role, flag, resolved.name, resolved.local_path, resolved.revision, chat, record), tokenizer


def _length_limit(max_length: int | None, models: dict, backend: str) -> int | None:
    """--max-length, or the models' own limit; vLLM scores at most max_model_len - 1 tokens."""
    room = 1 if backend == "vllm" else 0
    limits = {role: max_positions(model) for role, model in models.items()}
    limits = {role: n - room for role, n in limits.items() if n}
    if max_length is None:
        return min(limits.values()) if limits else None
    for role, limit in limits.items():
        if max_length > limit:
            raise DadpoError(f"--max-length {max_length}: the {role} {models[role].name} takes at most {limit} "
                             f"tokens{' with the vllm backend' if room else ''} (max_position_embeddings)")
    return max_length


def _refuse_differences(out: Path, existing: dict, header: dict) -> None:
    changed = differences(existing, new_manifest(header))
    if changed:
        raise DadpoError(
            f"--out {out}: the cache there was made with different settings: {'; '.join(changed)}. "
            "Pass --overwrite to start over, or choose another --out"
        )


def _read_existing(out: Path) -> dict | None:
    try:
        return read_manifest(out)
    except DadpoError as exc:
        raise DadpoError(f"{exc}; pass --overwrite to start over, or choose another --out") from None


def _open_or_create(out: Path, header: dict, overwrite: bool) -> dict:
    with locked(out):
        if overwrite and manifest_path(out).exists():
            # The manifest goes last: a crash in between leaves a cache that --overwrite still recognises.
            for name in ("shards", WORK_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / DROPPED_NAME).unlink(missing_ok=True)
            manifest_path(out).unlink()
        existing = _read_existing(out)
        if existing is None:
            _refuse_foreign(out)
            manifest = new_manifest(header)
            write_json_atomic(manifest_path(out), manifest)
            return manifest
        _refuse_differences(out, existing, header)  # again under the lock: another worker may have made it
        return existing


# ---- shards: recheck, adopt, assemble ------------------------------------------------------


def _recheck_recorded(out: Path, manifest: dict, mine: list[int]) -> list[int]:
    """Recorded shards of this worker whose file is gone or altered: forget them, to recompute."""
    broken = []
    for entry in manifest["shards"]:
        if entry["index"] in mine:
            try:
                check_shard(out / entry["file"], entry)
            except DadpoError:
                broken.append(entry["index"])
                (out / entry["file"]).unlink(missing_ok=True)
                forget_shard(out, entry["index"])
    return broken


def _adopt(out: Path, k: int, num_shards: int, shard_size: int, rows: pl.DataFrame, plan: ShardPlan) -> bool:
    """Record shard k if its file is on disk but not in the manifest (killed between the rename
    and the manifest update) and holds exactly the planned pairs with finite scores. A file that
    fails the check is removed, and the shard is computed again."""
    file = out / shard_file(k, num_shards)
    if not file.exists():
        return False
    try:
        table = pq.read_table(file)
        fixed = shard_columns()
        ok = all(name in table.column_names and table.schema.field(name).type.equals(kind)
                 for name, kind in fixed.items())
        ok = ok and table["pair_index"].to_pylist() == plan.kept
        expected_ids = rows["id"].gather(plan.kept).to_list() if plan.kept else []
        ok = ok and table["id"].to_pylist() == expected_ids
        for name in ("teacher_logp_chosen", "teacher_logp_rejected", "ref_logp_chosen", "ref_logp_rejected"):
            ok = ok and pl.from_arrow(table[name]).is_finite().all()
    except (pa.ArrowException, OSError):
        ok = False
    if not ok:
        file.unlink(missing_ok=True)
        return False
    record_shard(out, _entry(k, num_shards, shard_size, rows.height, table.num_rows, file, plan))
    for role in ROLES:
        part_path(out, role, k).unlink(missing_ok=True)
    return True


def _entry(k: int, num_shards: int, shard_size: int, num_pairs: int, num_rows: int, file: Path,
           plan: ShardPlan, digest: str | None = None) -> dict:
    return {"index": k, "file": shard_file(k, num_shards), "rows": num_rows,
            "pair_range": [k * shard_size, min((k + 1) * shard_size, num_pairs)],
            "sha256": digest or sha256_file(file), "bytes": file.stat().st_size, "dropped_ids": plan.dropped}


def _assemble(out: Path, k: int, num_shards: int, shard_size: int, rows: pl.DataFrame, plan: ShardPlan) -> None:
    """Join the pair rows with both passes' results into the final shard; record it."""
    parts = {role: pq.read_table(part_path(out, role, k)) for role in ROLES}
    for role, part in parts.items():
        if part["pair_index"].to_pylist() != plan.kept:
            raise DadpoError(f"{part_path(out, role, k)}: holds other pairs than the length rule keeps; "
                             "re-run with --overwrite")
    pairs = rows.slice(k * shard_size, shard_size)
    kept = pairs.join(pl.from_arrow(parts["teacher"].select(["pair_index"])), on="pair_index", how="semi")
    renamed = {}
    for prefix, part in (("teacher", parts["teacher"]), ("ref", parts["reference"])):
        for name in part.column_names:
            if name != "pair_index":
                renamed[f"{prefix}_{name}"] = part[name]
    fixed = shard_columns()
    columns = {name: kept[name].to_arrow() if name in kept.columns else renamed[name] for name in fixed}
    table = pa.table({name: columns[name].cast(fixed[name]) for name in fixed})
    for extra in kept.columns:
        if extra not in fixed:
            table = table.append_column(extra, kept[extra].to_arrow())
    file = out / shard_file(k, num_shards)
    digest = write_parquet_atomic(table, file)
    record_shard(out, _entry(k, num_shards, shard_size, rows.height, table.num_rows, file, plan, digest))
    for role in ROLES:
        part_path(out, role, k).unlink(missing_ok=True)


def _finish(out: Path) -> dict:
    """Rewrite dropped_ids.txt from the manifest; the run that finds the cache complete
    removes the scratch folder and every temporary file."""
    with locked(out):
        manifest = read_manifest(out)
        write_dropped_ids(out, manifest)
        if manifest["complete"]:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
            sweep_temp_files(out, everything=True)
    return manifest
