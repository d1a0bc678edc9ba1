"""`dadpo generate`: one teacher and one student response per prompt, written as a pairs file.

    prompts file --load_prompts--> OUT.work/prompts.parquet
        --teacher pass--> OUT.work/teacher/NNNNN.parquet   (one model in memory)
        --student pass--> OUT.work/student/NNNNN.parquet   (the other, after the first is freed)
        --assemble-->     OUT (pairs spec: id, prompt, chosen = teacher, rejected = student)

Each model renders prompts with its own chat template, through the one tokenization rule
(dadpo.tokenization.encode_prompt), and its response is decoded without special tokens (the
end-of-turn token is where generation stops, not part of the text). Work goes in chunks of
`chunk_size` prompts, each written atomically; a re-run skips the chunks on disk, so a crash
costs at most one chunk. Chunk k is sampled from a seed derived from (seed, role, k) (hf) or
each prompt from (seed, role, id) (vllm), so an interrupted run gives the same pairs as an
uninterrupted one. The sampling settings and the models travel in the output's Parquet
metadata (key "dadpo.generate") and in the sidecar OUT.generate.json.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo.cache import write_parquet_atomic
from dadpo.errors import DadpoError
from dadpo.manifest import write_json_atomic
from dadpo.modeling import ResolvedModel, load_tokenizer, resolve_model, resolved_dtype, torch_dtype, weights_digest
from dadpo.pairs import _canonical_json, _extra_series, _normalize_id, _normalize_prompt, _read, prompt_messages
from dadpo.sampling import Sampling, make_sampler
from dadpo.scoring import backend_version, pick_backend
from dadpo.scoring.base import EngineOptions
from dadpo.scoring.isolated import call_isolated
from dadpo.tokenization import encode_prompt, tokenizer_digest, uses_chat_template

ROLES = ("teacher", "student")
METADATA_KEY = "dadpo.generate"
FORMAT_VERSION = 1
# A pairs file that is used as a prompts file keeps its prompts (and extras), not its responses.
_IGNORED_COLUMNS = ("chosen", "rejected")


@dataclass
class GenerateConfig:
    prompts: str
    teacher: str
    student: str
    out: str
    backend: str = "auto"
    sampling: Sampling = field(default_factory=Sampling)
    dtype: str = "auto"
    teacher_revision: str | None = None
    student_revision: str | None = None
    chunk_size: int = 512
    overwrite: bool = False
    no_chat_template: bool = False
    trust_remote_code: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)  # batch_size/device (hf), the rest (vllm)
    progress: bool = True


@dataclass
class GenerateSummary:
    path: str
    rows: int
    dropped: dict  # id -> why (an empty response cannot be a pair)
    truncated: dict  # role -> responses cut at max_new_tokens
    pass_stats: dict  # role -> {responses, tokens, seconds, tokens_per_s}, for the passes run now
    seconds: float
    already_done: bool = False


# ---- prompts ------------------------------------------------------------------------------------


@dataclass
class Prompts:
    source: str
    frame: pl.DataFrame  # id, prompt (canonical messages JSON), then the extra columns
    extra_columns: list[str]
    fingerprint: str


def load_prompts(path: str | os.PathLike) -> Prompts:
    """Read a prompts file (.parquet, .jsonl, .json or a datasets folder) with a `prompt` column
    (a string or a list of {role, content} messages) and an optional `id`; the same normalisation
    and one-line errors as the pairs loader. `chosen`/`rejected` columns are ignored; other
    columns travel through to the output."""
    source = os.fspath(path)
    columns = _read(Path(source), source)
    if columns.num_rows == 0:
        raise DadpoError(f"{source}: has no rows")
    if "prompt" not in columns.names:
        close = difflib.get_close_matches("prompt", columns.names, n=1)
        guess = f"; did you mean '{close[0]}'?" if close else ""
        raise DadpoError(f"{source}: missing column 'prompt' (found: {', '.join(columns.names) or 'none'}){guess}; "
                         "expected prompt [, id]")
    given_ids, line_numbers = columns.values.get("id"), columns.line_numbers
    unit = "line" if line_numbers else "row"
    ids, prompt_jsons, first_seen = [], [], {}
    fingerprint = hashlib.sha256()
    for index, value in enumerate(columns.values["prompt"]):
        position = line_numbers[index] if line_numbers else index
        where = f"{source} {unit} {position}"
        row_id = None
        if given_ids is not None:
            row_id = _normalize_id(given_ids[index], where)
            where = f"{where} (id {row_id!r})"
        prompt_json = _canonical_json(_normalize_prompt(value, where))
        row_id = row_id or hashlib.sha256(prompt_json.encode("utf-8")).hexdigest()[:16]
        if row_id in first_seen:
            same = " (the same prompt twice; give the rows ids to keep both)" if given_ids is None else ""
            raise DadpoError(f"{source}: duplicate id {row_id!r} ({unit}s {first_seen[row_id]} and {position}){same}")
        first_seen[row_id] = position
        fingerprint.update(_canonical_json([row_id, prompt_json]).encode("utf-8") + b"\n")
        ids.append(row_id)
        prompt_jsons.append(prompt_json)
    extras = [n for n in columns.names if n not in ("id", "prompt", *_IGNORED_COLUMNS)]
    frame = pl.DataFrame([pl.Series("id", ids, dtype=pl.Utf8), pl.Series("prompt", prompt_jsons, dtype=pl.Utf8),
                          *(_extra_series(name, columns) for name in extras)])
    return Prompts(source, frame, extras, fingerprint.hexdigest())


# ---- the pipeline -------------------------------------------------------------------------------


def generate_pairs(cfg: GenerateConfig) -> GenerateSummary:
    started = time.time()
    _check_flags(cfg)
    out = Path(cfg.out)
    work = work_dir(out)
    prompts = load_prompts(cfg.prompts)
    backend = pick_backend(cfg.backend)
    sides = {
        "teacher": _describe(cfg, "--teacher", cfg.teacher, cfg.teacher_revision, backend),
        "student": _describe(cfg, "--student", cfg.student, cfg.student_revision, backend),
    }
    settings = {
        "format_version": FORMAT_VERSION,
        "prompts": {"source": str(cfg.prompts), "fingerprint": prompts.fingerprint, "rows": prompts.frame.height},
        "sampling": asdict(cfg.sampling),
        "backend": backend,
        "backend_version": backend_version(backend),
        "chunk_size": cfg.chunk_size,
        # hf draws a batch's samples from one RNG stream, so the batching is part of the result
        "batch_size": cfg.engine.batch_size if backend == "hf" else None,
        **{role: side["record"] for role, side in sides.items()},
    }
    if out.exists():
        done = _finished_settings(out)
        if cfg.overwrite:
            out.unlink()
        elif done is not None and _guarded(done) == _guarded(settings):
            return GenerateSummary(str(out), done["rows"], done["dropped"], done["truncated"], {},
                                   time.time() - started, already_done=True)
        else:
            why = f"made with other settings ({', '.join(_changed(done, settings))})" if done else \
                "not made by dadpo generate"
            raise DadpoError(f"--out {out}: exists, {why}; pass --overwrite to replace it, or choose another --out")
    _open_work(work, settings, cfg.overwrite)
    prompts_file = work / "prompts.parquet"
    if not prompts_file.exists():
        write_parquet_atomic(prompts.frame.to_arrow(), prompts_file)

    num_chunks = math.ceil(prompts.frame.height / cfg.chunk_size)
    pass_stats = {}
    for role in ROLES:
        todo = [k for k in range(num_chunks) if not _chunk_path(work, role, k).exists()]
        if todo:
            job = _PassJob(role, sides[role]["model"], sides[role]["chat"], str(work), todo, cfg, backend)
            # vLLM does not give all memory back in-process: each model's pass gets its own process
            pass_stats[role] = call_isolated(run_pass, job) if backend == "vllm" else run_pass(job)
    rows, dropped, truncated = _assemble(out, work, num_chunks, settings)
    shutil.rmtree(work, ignore_errors=True)
    return GenerateSummary(str(out), rows, dropped, truncated, pass_stats, time.time() - started)


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".generate.json")


def read_generation_settings(path: str | os.PathLike) -> dict | None:
    """The settings a finished `dadpo generate` output was made with (None if it has none)."""
    return _finished_settings(Path(path))


def _check_flags(cfg: GenerateConfig) -> None:
    s = cfg.sampling
    if s.max_new_tokens < 1:
        raise DadpoError(f"--max-new-tokens {s.max_new_tokens}: must be at least 1")
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise DadpoError(f"--temperature {s.temperature}: must be >= 0 (0 is greedy decoding)")
    if not 0 < s.top_p <= 1:
        raise DadpoError(f"--top-p {s.top_p}: must be in (0, 1]")
    if cfg.chunk_size < 1:
        raise DadpoError(f"--chunk-size {cfg.chunk_size}: must be at least 1")
    if cfg.engine.batch_size < 1:
        raise DadpoError(f"--batch-size {cfg.engine.batch_size}: must be at least 1")
    if Path(cfg.out).suffix.lower() not in (".parquet", ".jsonl"):
        raise DadpoError(f"--out {cfg.out}: name the pairs file .parquet or .jsonl")
    if Path(cfg.out).is_dir():
        raise DadpoError(f"--out {cfg.out}: is a folder, expected a pairs file name")
    torch_dtype(cfg.dtype)


def _describe(cfg: GenerateConfig, flag: str, name: str, revision: str | None, backend: str) -> dict:
    resolved = resolve_model(name, revision, flag)
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code, flag)
    chat = uses_chat_template(tokenizer, cfg.no_chat_template)
    record = {"model": name, "revision": resolved.revision, "weights_digest": weights_digest(resolved),
              "tokenizer_digest": tokenizer_digest(tokenizer, chat), "chat_template": chat,
              "dtype": resolved_dtype(resolved, cfg.dtype)}
    return {"model": resolved, "chat": chat, "record": record}


def _guarded(settings: dict) -> dict:
    """What must match for existing work to be reused: all but where the prompts file was read."""
    kept = {k: v for k, v in settings.items() if k not in ("rows", "dropped", "truncated")}
    kept["prompts"] = {k: v for k, v in settings["prompts"].items() if k != "source"}
    return kept


def _changed(existing: dict, requested: dict) -> list[str]:
    """The guarded settings that differ, as dotted names (sampling.temperature, teacher.weights_digest)."""
    have, want = _guarded(existing), _guarded(requested)
    names = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            names.append(key)
    return names


def _open_work(work: Path, settings: dict, overwrite: bool) -> None:
    settings_file = work / "settings.json"
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)
    if settings_file.exists():
        existing = json.loads(settings_file.read_text(encoding="utf-8"))
        if _guarded(existing) != _guarded(settings):
            raise DadpoError(f"--out: unfinished work in {work} was made with other settings "
                             f"({', '.join(_changed(existing, settings))}); "
                             "re-run with the same flags to finish it, or pass --overwrite to start over")
        return
    if work.exists() and any(work.iterdir()):
        raise DadpoError(f"--out: {work} holds files but no settings.json; pass --overwrite to start over")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_file, settings)


def _finished_settings(out: Path) -> dict | None:
    if out.suffix.lower() == ".parquet":
        try:
            metadata = pq.read_schema(out).metadata or {}
        except (pa.ArrowException, OSError):
            return None
        raw = metadata.get(METADATA_KEY.encode())
        return json.loads(raw) if raw else None
    sidecar = sidecar_path(out)
    return json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else None


def _chunk_path(work: Path, role: str, k: int) -> Path:
    return Path(work) / role / f"{k:05d}.parquet"


# ---- one pass: one model over its missing chunks --------------------------------------------------


@dataclass
class _PassJob:
    role: str
    model: ResolvedModel
    chat: bool
    work: str
    chunks: list
    cfg: GenerateConfig
    backend: str


def run_pass(job: _PassJob) -> dict:
    """Generate job.role's responses for job.chunks, one part file per chunk."""
    from tqdm import tqdm

    cfg = job.cfg
    tokenizer = load_tokenizer(job.model, cfg.trust_remote_code)
    prompts = pl.read_parquet(Path(job.work) / "prompts.parquet", columns=["id", "prompt"])
    engine = make_sampler(job.backend, job.model, tokenizer, job.chat, cfg.sampling, job.role, cfg.dtype, cfg.engine,
                          cfg.trust_remote_code)
    bar = tqdm(total=sum(min(cfg.chunk_size, prompts.height - k * cfg.chunk_size) for k in job.chunks),
               desc=f"generate {job.role} {job.model.name} [{job.backend}]", unit="prompt",
               disable=not cfg.progress, file=sys.stderr, mininterval=1.0)
    responses = tokens = 0
    started = time.time()
    try:
        for k in job.chunks:
            rows = prompts.slice(k * cfg.chunk_size, cfg.chunk_size)
            prompt_ids = []
            for row_id, prompt_json in rows.iter_rows():
                where = f"{cfg.prompts} id '{row_id}' ({job.role} {job.model.name})"
                prompt_ids.append(encode_prompt(tokenizer, prompt_messages(prompt_json), job.chat, where))
                engine.check_length(len(prompt_ids[-1]), where)
            outputs = engine.generate(prompt_ids, rows["id"].to_list(), k)  # [(token ids, finish reason)]
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
            table = pa.table({
                "id": pa.array(rows["id"].to_list(), pa.string()),
                "response": pa.array(texts, pa.string()),
                "finish_reason": pa.array([reason for _, reason in outputs], pa.string()),
                "num_tokens": pa.array([len(ids) for ids, _ in outputs], pa.int32()),
            })
            write_parquet_atomic(table, _chunk_path(Path(job.work), job.role, k))
            responses += rows.height
            tokens += sum(len(ids) for ids, _ in outputs)
            bar.update(rows.height)
    finally:
        bar.close()
        engine.close()
    seconds = time.time() - started
    return {"responses": responses, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


# ---- assembly -----------------------------------------------------------------------------------


def _assemble(out: Path, work: Path, num_chunks: int, settings: dict) -> tuple[int, dict, dict]:
    prompts = pl.read_parquet(work / "prompts.parquet")
    parts = {role: pl.concat([pl.read_parquet(_chunk_path(work, role, k)) for k in range(num_chunks)])
             for role in ROLES}
    for role in ROLES:
        if parts[role]["id"].to_list() != prompts["id"].to_list():
            raise DadpoError(f"{work}: the {role} chunks do not line up with the prompts; pass --overwrite")
    teacher, student = parts["teacher"], parts["student"]
    dropped = {}
    for row_id, chosen, rejected in zip(prompts["id"], teacher["response"], student["response"]):
        empty = [role for role, text in (("teacher", chosen), ("student", rejected)) if not text.strip()]
        if empty:
            dropped[row_id] = f"empty {' and '.join(empty)} response"
    truncated = {role: int((parts[role]["finish_reason"] == "length").sum()) for role in ROLES}
    keep = ~prompts["id"].is_in(list(dropped))
    assistant = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    # TRL's conversational preference format: prompt and both responses as message lists.
    frame = pl.concat([pl.DataFrame({
        "id": prompts["id"],
        "prompt": [prompt_messages(p) for p in prompts["prompt"]],
        "chosen": assistant(teacher["response"]),
        "rejected": assistant(student["response"]),
        "teacher_finish_reason": teacher["finish_reason"],
        "student_finish_reason": student["finish_reason"],
    }), prompts.drop("id", "prompt")], how="horizontal").filter(keep)
    record = {**settings, "rows": frame.height, "dropped": dropped, "truncated": truncated}
    metadata = json.dumps(record, ensure_ascii=False)
    # The sidecar first: a crash between the two leaves no output, so the re-run redoes the assembly.
    write_json_atomic(sidecar_path(out), record)
    if out.suffix.lower() == ".parquet":
        table = frame.to_arrow()
        write_parquet_atomic(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                            METADATA_KEY.encode(): metadata.encode()}), out)
    else:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in frame.iter_rows(named=True):
                handle.write(_canonical_json(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    return frame.height, dropped, truncated
