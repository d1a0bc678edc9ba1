"""`dadpo cache-teacher`: score every pair once under each teacher and the reference, into shards.

    pairs file --load_pairs-->  normalised pairs, fingerprint              (dadpo.pairs)
        --plan-->               every model's token ids of each pending shard, length rule applied,
                                before any model loads: template refusals and over-long pairs
                                surface in seconds                          (dadpo.cache.passes)
        --one pass per model--> its scores of each shard; one model in memory at a time, each vLLM
                                engine in its own process                   (dadpo.cache.passes)
        --assemble-->           shards/shard-NNNNN-of-MMMMM.parquet + its manifest entry
                                                                            (dadpo.cache.shards)

Shard k always holds pairs [k*shard_size, (k+1)*shard_size), and worker i of n owns the shards with
k % n == i, so any number of workers, runs and restarts produce the same files. Each step skips what
is already on disk, and every file appears atomically (dadpo.atomic). A re-run after a crash, a
kill -9 or a stop signal therefore continues where it stopped, with no pair lost or duplicated: it
adopts a shard written just before the crash but not yet recorded (after checking it holds exactly
the pairs it should), recomputes a recorded shard whose file no longer matches its checksum, and
clears temporary files that dead writers left behind.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from dadpo import stop
from dadpo.atomic import sweep_temp_files, temp_path, write_json_atomic, write_parquet_atomic
from dadpo.cache.claims import worker_claim
from dadpo.cache.layout import (DROPPED_NAME, MANIFEST_NAME, REFERENCE, SCHEMA_VERSION, SHARDS_DIR, WORK_DIR,
                                shard_file, teacher_prefix, work_path)
from dadpo.cache.manifest import (differences, forget_shard, locked, manifest_path, new_manifest, read_manifest,
                                  record_shard, write_dropped_ids)
from dadpo.cache.models import Sides, describe_models, server_settings
from dadpo.cache.passes import PLAN_COLUMNS, PassJob, plan_shards, run_pass
from dadpo.cache.shards import Cache, assemble_shard, check_shard, shard_entry, whole_unrecorded_shard
from dadpo.config import CacheTeacherConfig
from dadpo.errors import DadpoError
from dadpo.modeling import check_device, check_dtype
from dadpo.ownership import ensure_owned
from dadpo.pairs import load_pairs
from dadpo.runner import run_passes
from dadpo.scoring import BACKENDS
from dadpo.scoring.client import check_server_flags
from dadpo.tokenization import PROMPT_FORMATS, check_date


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
    sequences_scored: int = 0
    sequences_reused: int = 0
    plan_seconds: float = 0.0
    planned: int = 0  # shards tokenized by this run


def cache_teacher(cfg: CacheTeacherConfig) -> CacheSummary:
    started = time.monotonic()
    _check_flags(cfg)
    if cfg.overwrite:
        _refuse_unowned(Path(cfg.out), cfg)  # before anything there changes
    out, created = _prepare_out(cfg.out)
    scratch = temp_path(out / "plan")
    try:
        existing = None if cfg.overwrite else _read_existing(out)  # before the claim: a refusal touches nothing
        _refuse_old_rule(out, existing)
        with stop.handling(), worker_claim(out, cfg.worker_index, cfg.num_workers):
            return _build(cfg, out, scratch, started, existing)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not any(p for p in out.iterdir() if p.name != ".lock"):
            shutil.rmtree(out, ignore_errors=True)  # refused before writing anything: leave no trace
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(cfg: CacheTeacherConfig, out: Path, scratch: Path, started: float, existing: dict | None
           ) -> CacheSummary:
    # the pairs first: a bad row is named in a second, before the models (and torch) load
    pairs = load_pairs(cfg.pairs, split=cfg.pairs_split, prompt_format=cfg.prompt_format, workdir=scratch)
    sides = describe_models(cfg, existing)
    num_shards = math.ceil(len(pairs) / cfg.shard_size)
    header = {"pairs": {"source": str(cfg.pairs), "fingerprint": pairs.fingerprint, "rows": len(pairs),
                        "extra_columns": pairs.extra_columns, "prompt_format": cfg.prompt_format},
              "length_rule": {"max_length": sides.max_length, "on_overlong": cfg.on_overlong,
                              "applies_to": "prompt+response tokens, under every model's tokenizer"},
              "shard_size": cfg.shard_size, "num_shards": num_shards,
              "reference": sides.reference.record, "teachers": {name: s.record for name, s in sides.teachers.items()}}
    if existing is not None:
        _refuse_differences(out, existing, header)  # early, before the tokenization below
    recorded = {s["index"] for s in existing["shards"]} if existing else set()
    mine = [k for k in range(num_shards) if k % cfg.num_workers == cfg.worker_index]

    # The plan: nothing under --out changes, and no model loads, until every pending pair tokenizes.
    plan_started = time.monotonic()
    planned = _plan(cfg, out, scratch, pairs, sides, [k for k in mine if k not in recorded])
    plan_seconds = time.monotonic() - plan_started

    manifest = _open_or_create(out, header, cfg.overwrite)
    recorded = {s["index"] for s in manifest["shards"]}  # again: another process may have recorded some since
    _publish_plan(out, scratch, planned)
    sweep_temp_files(out)
    repaired = _recheck_recorded(out, manifest, mine)
    todo, adopted = [], []
    for k in sorted(set(k for k in mine if k not in recorded) | set(repaired)):
        if not work_path(out, "tokens", k).exists():  # a repaired shard's tokens were removed with it
            _publish_plan(out, scratch, _plan(cfg, out, scratch, pairs, sides, [k]))
        if _adopt(out, k, manifest, pairs):
            adopted.append(k)
        else:
            todo.append(k)

    if cfg.plan_only:
        totals = manifest["totals"]
        return CacheSummary(str(out), totals["rows"], totals["dropped"], totals["shards_done"], num_shards,
                            manifest["complete"], time.monotonic() - started, {}, len(adopted), len(repaired),
                            plan_seconds=plan_seconds, planned=len(planned))
    jobs = [PassJob(side, str(out), [k for k in todo if not work_path(out, side.prefix, k).exists()], sides.backend,
                    cfg.engine, sides.max_length, cfg.trust_remote_code, cfg.progress, list(cfg.reuse_from),
                    server_settings(cfg, side, sides.max_length), str(cfg.pairs))
            for side in sides.in_pass_order()]
    jobs = [job for job in jobs if job.shards]
    try:
        pass_stats = run_passes(run_pass, jobs, isolated=lambda job: sides.backend == "vllm" and not job.side.url)
    finally:  # also on a stop signal: every shard all models scored is published before the process ends
        for k in todo:
            if all(work_path(out, side.prefix, k).exists() for side in sides.in_pass_order()):
                _assemble(out, k, manifest, pairs, sides)
        manifest = _finish(out)
    totals = manifest["totals"]
    return CacheSummary(str(out), totals["rows"], totals["dropped"], totals["shards_done"], num_shards,
                        manifest["complete"], time.monotonic() - started, pass_stats, len(adopted), len(repaired),
                        totals["sequences_scored"], totals["sequences_reused"], plan_seconds, len(planned))


# ---------------------------------------------------------------- the folder


def _check_flags(cfg: CacheTeacherConfig) -> None:
    # Only cheap checks here (no torch import): a mistyped flag is refused in well under a second.
    if cfg.backend not in BACKENDS:
        raise DadpoError(f"--backend {cfg.backend}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if cfg.on_overlong not in ("drop", "error"):
        raise DadpoError(f"--on-overlong {cfg.on_overlong}: choose drop or error")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise DadpoError(f"--prompt-format {cfg.prompt_format}: choose {' or '.join(PROMPT_FORMATS)}")
    for flag, value, least in (("--shard-size", cfg.shard_size, 1), ("--num-workers", cfg.num_workers, 1),
                               ("--batch-size", cfg.engine.batch_size, 1), ("--plan-workers", cfg.plan_workers, 0)):
        if value < least:
            raise DadpoError(f"{flag} {value}: must be at least {least}")
    check_server_flags(cfg.server_concurrency, cfg.server_timeout, cfg.server_retries)
    if cfg.max_length is not None and cfg.max_length < 2:
        raise DadpoError(f"--max-length {cfg.max_length}: must be at least 2")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise DadpoError(f"--worker-index {cfg.worker_index}: must be in 0..{cfg.num_workers - 1} "
                         f"(--num-workers {cfg.num_workers})")
    if isinstance(cfg.reuse_from, str):
        cfg.reuse_from = [cfg.reuse_from]
    for old in cfg.reuse_from:
        manifest = read_manifest(Path(old)) if Path(old).is_dir() else None
        if manifest is None:
            raise DadpoError(f"--reuse-from {old}: not a dadpo cache (no manifest.json)")
        if manifest["schema_version"] < 2:
            raise DadpoError(f"--reuse-from {old}: a schema {manifest['schema_version']} cache records no sequence keys; "
                             "only caches made by this dadpo can be reused")
        try:  # its scores are copied under fresh checksums: each recorded shard must be as recorded
            Cache(Path(old), manifest).verify()
        except DadpoError as exc:
            raise DadpoError(f"--reuse-from {old}: {exc}") from None
    check_date(cfg.template_date)
    check_dtype(cfg.dtype)
    check_device(cfg.engine.device)


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
        probe = temp_path(folder / ".write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise DadpoError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return folder, created


def _refuse_foreign(folder: Path) -> None:
    # dadpo writes the manifest before anything else, so shards/ or work/ without one are not a
    # dadpo cache's: never write into (or, with --overwrite, delete) someone else's files.
    foreign = [f"{name}/" for name in (SHARDS_DIR, WORK_DIR) if (folder / name).exists()]
    if foreign and not manifest_path(folder).exists():
        raise DadpoError(f"--out {folder}: holds {' and '.join(foreign)} but no manifest.json, so it is not a "
                         "dadpo cache; choose another --out")


def _refuse_unowned(out: Path, cfg: CacheTeacherConfig) -> None:
    # --overwrite removes shards/, work/, dropped_ids.txt and the manifest: only where a manifest that
    # reads as dadpo's says the folder is a cache, and never what this run reads
    reads = [("--pairs", cfg.pairs), ("--reference", cfg.reference)] + [("--reuse-from", old) for old in cfg.reuse_from]
    reads += [("--teacher", spec.partition("=")[2] if "=" in spec and not Path(spec).exists() else spec)
              for spec in cfg.teacher]
    ensure_owned(out, flag="--out", what="a dadpo cache", marker=MANIFEST_NAME,
                 parse=lambda path: read_manifest(path.parent), removes=[SHARDS_DIR, WORK_DIR, DROPPED_NAME,
                                                                         MANIFEST_NAME], protected=reads)


def _refuse_old_rule(out: Path, existing: dict | None) -> None:
    if existing is not None and existing["schema_version"] != SCHEMA_VERSION:
        raise DadpoError(f"--out {out}: a cache made by tokenization rule {existing.get('tokenization_rule')} (schema "
                         f"{existing['schema_version']}); this dadpo scores by rule 2 (data_specs/tokenization.v2.md). "
                         "Training from that cache still works; to cache these pairs by rule 2, pass --overwrite to "
                         "start over, or choose another --out")


def _refuse_differences(out: Path, existing: dict, header: dict) -> None:
    changed = differences(existing, new_manifest(header))
    if changed:
        raise DadpoError(f"--out {out}: the cache there was made with different settings: {'; '.join(changed)}. "
                         "Pass --overwrite to start over, or choose another --out")


def _read_existing(out: Path) -> dict | None:
    try:
        return read_manifest(out)
    except DadpoError as exc:
        # --overwrite clears only a folder whose manifest reads as dadpo's, so it is no way out here
        raise DadpoError(f"{exc}; choose another --out (or remove that folder yourself if it is yours)") from None


def _open_or_create(out: Path, header: dict, overwrite: bool) -> dict:
    with locked(out):
        if overwrite and manifest_path(out).exists():
            # The manifest goes last: a crash in between leaves a cache that --overwrite still recognises.
            for name in (SHARDS_DIR, WORK_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / DROPPED_NAME).unlink(missing_ok=True)
            manifest_path(out).unlink()
        existing = _read_existing(out)
        if existing is None:
            _refuse_foreign(out)
            manifest = new_manifest({**header, "template_date": _pinned_date(header)})
            write_json_atomic(manifest_path(out), manifest)
            return manifest
        _refuse_differences(out, existing, header)  # again under the lock: another worker may have made it
        return existing


def _pinned_date(header: dict) -> str | None:
    dates = {s.get("template_date") for s in [header["reference"], *header["teachers"].values()]} - {None}
    return dates.pop() if dates else None


# ---------------------------------------------------------------- plan, adopt, assemble


def _plan(cfg, out: Path, scratch: Path, pairs, sides: Sides, shards: list[int]) -> list[int]:
    """Tokenize the shards whose token file is not in CACHE/work yet, into the scratch folder (in
    worker processes when there are several: the plan is CPU-bound, the tokenizers single-threaded)."""
    shards = [k for k in shards if not work_path(out, "tokens", k).exists()]
    if not shards:
        return []

    def read_rows(k: int) -> list[dict]:
        return _shard_rows(pairs, k, cfg.shard_size).select(PLAN_COLUMNS).to_dicts()

    def write(k: int, planned) -> None:
        write_parquet_atomic(planned.table(), work_path(scratch, "tokens", k),
                             metadata={"dropped_ids": _json(planned.dropped)})

    plan_shards(shards, read_rows, write, sides.tokenizers(cfg.trust_remote_code),
                {side.prefix: side.flag for side in sides.in_pass_order()}, sides.max_length, cfg.on_overlong,
                str(cfg.pairs), cfg.plan_workers, cfg.progress)
    return shards


def _publish_plan(out: Path, scratch: Path, shards: list[int]) -> None:
    """Move the plan from the scratch folder into CACHE/work (renames; first writer wins)."""
    (out / WORK_DIR / "tokens").mkdir(parents=True, exist_ok=True)
    for k in shards:
        source, target = work_path(scratch, "tokens", k), work_path(out, "tokens", k)
        if target.exists():
            source.unlink(missing_ok=True)
        else:
            os.replace(source, target)


def _shard_rows(pairs, k: int, shard_size: int):
    import polars as pl

    rows = pairs.slice(k * shard_size, shard_size)
    return rows.with_columns(pl.int_range(k * shard_size, k * shard_size + rows.height, dtype=pl.Int64)
                             .alias("pair_index"))


def _json(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _dropped(out: Path, k: int) -> list[str]:
    import json

    metadata = pq.read_schema(work_path(out, "tokens", k)).metadata or {}
    return json.loads(metadata.get(b"dropped_ids", b"[]"))


def _recheck_recorded(out: Path, manifest: dict, mine: list[int]) -> list[int]:
    """Recorded shards of this worker whose file is gone or altered: forget them, to recompute."""
    broken = []
    for entry in manifest["shards"]:
        if entry["index"] in mine:
            try:
                check_shard(out / entry["file"], entry, manifest)
            except DadpoError:
                broken.append(entry["index"])
                (out / entry["file"]).unlink(missing_ok=True)
                forget_shard(out, entry["index"])
    return broken


def _adopt(out: Path, k: int, manifest: dict, pairs) -> bool:
    """Record shard k if its file is whole on disk but unrecorded (a crash between the two)."""
    kept = pq.read_table(work_path(out, "tokens", k), columns=["pair_index"])["pair_index"].to_pylist()
    table = whole_unrecorded_shard(out, k, manifest, _shard_rows(pairs, k, manifest["shard_size"]), kept)
    if table is None:
        return False
    record_shard(out, shard_entry(k, manifest, table.num_rows, out / shard_file(k, manifest["num_shards"]),
                                  _dropped(out, k)))
    _remove_work(out, k, manifest)
    return True


def _assemble(out: Path, k: int, manifest: dict, pairs, sides: Sides) -> None:
    tokens = pq.read_table(work_path(out, "tokens", k))
    scores, counts = {}, {"scored": 0, "reused": 0}
    for side in sides.in_pass_order():
        part = pq.read_table(work_path(out, side.prefix, k))
        scores[side.prefix] = part
        metadata = part.schema.metadata or {}
        for key in counts:
            counts[key] += int(metadata.get(key.encode(), b"0"))
    entry = assemble_shard(out, k, manifest, _shard_rows(pairs, k, manifest["shard_size"]), tokens, scores,
                           _dropped(out, k), counts)
    record_shard(out, entry)
    _remove_work(out, k, manifest)


def _remove_work(out: Path, k: int, manifest: dict) -> None:
    prefixes = [REFERENCE] + [teacher_prefix(name) for name in manifest["teachers"]]
    for part in ["tokens", *prefixes]:
        work_path(out, part, k).unlink(missing_ok=True)


def _finish(out: Path) -> dict:
    """Rewrite dropped_ids.txt from the manifest; the run that finds the cache complete removes the
    scratch folder and every temporary file."""
    with locked(out):
        manifest = read_manifest(out)
        write_dropped_ids(out, manifest)
        if manifest["complete"]:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
            sweep_temp_files(out, everything=True)
    return manifest
