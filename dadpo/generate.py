"""`dadpo generate`: one teacher and one student response per prompt, written as a pairs file.

    prompts file --load_prompts-->  OUT.work/prompts.parquet                         (dadpo.pairs)
        --teacher pass-->           OUT.work/teacher/NNNNN.parquet   (one model in memory; dadpo.runner)
        --student pass-->           OUT.work/student/NNNNN.parquet   (the other, after the first is freed)
        --assemble-->               OUT (pairs v2: id, prompt, chosen = teacher, rejected = student,
                                    and each response's sampled ids, vocabulary and finish reason)

Each model renders prompts with its own chat template and variables through the one tokenization
rule (dadpo.tokenization), and samples until one of its stop tokens. The sampled ids (stop token
included) travel in the output, so cache-teacher and sft score exactly what was sampled; the text
is their decoding. Work goes in chunks of `chunk_size` prompts, each written atomically; a re-run
skips the chunks on disk, so a crash or a stop signal costs at most one chunk. Chunk k is sampled
from a seed derived from (seed, role, k) (hf) or each prompt from (seed, role, id) (vllm, or a
model served by vLLM: --teacher-url/--student-url), so an interrupted run gives the same pairs as an
uninterrupted one. The settings (sampling, models, template variables, the pinned template date)
travel in the output's Parquet metadata (key "dadpo.generate") and in the sidecar OUT.generate.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from dadpo import stop
from dadpo.atomic import write_atomic, write_json_atomic, write_parquet_atomic
from dadpo.errors import DadpoError, first_line
from dadpo.modeling import (ResolvedModel, check_device, model_tokenizer, resolve_model, resolved_dtype, torch_dtype,
                            weights_digest)
from dadpo.config import GenerateConfig
from dadpo.ownership import ensure_owned, read_json_object
from dadpo.pairs import decode_prompt, load_prompts
from dadpo.runner import Progress, run_passes
from dadpo.sampling import make_sampler, served_model_settings
from dadpo.scoring.client import check_server_flags, served_key
from dadpo.scoring import backend_version, pick_backend
from dadpo.tokenization import check_date, parse_template_kwargs, today

ROLES = ("teacher", "student")
METADATA_KEY = "dadpo.generate"
SETTINGS_NAME = "settings.json"  # OUT.work's marker: written first
FORMAT_VERSION = 2


@dataclass
class GenerateSummary:
    path: str
    rows: int
    dropped: dict  # id -> why (an empty response cannot be a pair)
    truncated: dict  # role -> responses cut at max_new_tokens
    pass_stats: dict  # role -> {responses, tokens, seconds, tokens_per_s}, for the passes run now
    seconds: float
    already_done: bool = False


def generate_pairs(cfg: GenerateConfig) -> GenerateSummary:
    started = time.monotonic()
    _check_flags(cfg)
    out = Path(cfg.out)
    work = work_dir(out)
    if cfg.overwrite:
        _refuse_unowned(cfg, out, work)  # before anything: --overwrite replaces OUT and removes OUT.work
    backend = pick_backend(cfg.backend)  # for the models not served
    if cfg.teacher_url and cfg.student_url:
        backend = "server"
    existing = _settings_file(work)
    date = cfg.template_date or (existing or {}).get("template_date") or today()
    keys = _api_keys(cfg)  # before any model is read: a missing key is found in a second
    sides = {role: _describe(cfg, role, backend, date, keys[role]) for role in ROLES}
    with _scratch(out) as scratch:
        prompts = load_prompts(cfg.prompts, split=cfg.prompts_split, prompt_format=cfg.prompt_format, workdir=scratch)
        settings = {
            "format_version": FORMAT_VERSION,
            "prompts": {"source": str(cfg.prompts), "fingerprint": prompts.fingerprint, "rows": prompts.num_rows,
                        "prompt_format": cfg.prompt_format},
            "sampling": asdict(cfg.sampling), "backend": backend,
            "backend_version": None if backend == "server" else backend_version(backend),
            "chunk_size": cfg.chunk_size,
            # hf draws a batch's samples from one RNG stream, so the batching is part of the result
            "batch_size": cfg.engine.batch_size if backend == "hf" else None,
            "template_date": date if any(side["record"]["template_date"] for side in sides.values()) else None,
            **{role: side["record"] for role, side in sides.items()},
        }
        if out.exists():
            done = _finished_settings(out)
            if cfg.overwrite:
                out.unlink()
            elif done is not None and _settings_for_reuse(done) == _settings_for_reuse(settings):
                return GenerateSummary(str(out), done["rows"], done["dropped"], done["truncated"], {},
                                       time.monotonic() - started, already_done=True)
            else:
                why = f"made with other settings ({', '.join(_changed(done, settings))})" if done else \
                    "not made by dadpo generate"
                raise DadpoError(f"--out {out}: exists, {why}; pass --overwrite to replace it, or choose another --out")
        _open_work(work, settings, cfg.overwrite)
        if not (work / "prompts.parquet").exists():
            os.replace(prompts.file, work / "prompts.parquet")

    num_chunks = math.ceil(prompts.num_rows / cfg.chunk_size)
    jobs = [_PassJob(role, sides[role]["model"], str(work),
                     [k for k in range(num_chunks) if not _chunk_path(work, role, k).exists()], cfg,
                     "server" if sides[role]["server"] else backend, date, sides[role]["server"]) for role in ROLES]
    with stop.handling():
        # vLLM does not give all memory back in-process: each model's pass gets its own process
        pass_stats = run_passes(run_pass, [job for job in jobs if job.chunks],
                                isolated=lambda job: job.backend == "vllm")
    rows, dropped, truncated = _assemble(out, work, num_chunks, settings)
    shutil.rmtree(work, ignore_errors=True)
    return GenerateSummary(str(out), rows, dropped, truncated, pass_stats, time.monotonic() - started)


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
    check_date(cfg.template_date)
    torch_dtype(cfg.dtype)
    check_device(cfg.engine.device)
    check_server_flags(cfg.server_concurrency, cfg.server_timeout, cfg.server_retries)


def _api_keys(cfg: GenerateConfig) -> dict:
    """role -> (the API key of its server, where it came from), or (None, None)."""
    keys = {}
    for role in ROLES:
        var, url = getattr(cfg, f"{role}_api_key_env"), getattr(cfg, f"{role}_url")
        keys[role] = served_key(var, f"--{role}-api-key-env", "", url) if var is not None else (None, None)
    return keys


def _describe(cfg: GenerateConfig, role: str, backend: str, date: str, key: tuple) -> dict:
    """The role's model, its record for the settings and, when it is served (--ROLE-url), the
    probed server's settings for the sampler."""
    flag = f"--{role}"
    resolved = resolve_model(getattr(cfg, role), getattr(cfg, f"{role}_revision"), flag)
    kwargs = parse_template_kwargs(getattr(cfg, f"{role}_template_kwargs"), f"--{role}-template-kwargs")
    tokenizer = model_tokenizer(resolved, flag, no_chat_template=cfg.no_chat_template, template_kwargs=kwargs,
                                template_date=date, trust_remote_code=cfg.trust_remote_code)
    record = {"model": getattr(cfg, role), "revision": resolved.revision, **tokenizer.record()}
    url = getattr(cfg, f"{role}_url")
    if url:
        server = served_model_settings(url, tokenizer, flag, api_key=key[0], key_source=key[1],
                                       concurrency=cfg.server_concurrency, timeout_s=cfg.server_timeout,
                                       retries=cfg.server_retries)
        # the weights behind a server cannot be digested here: its model, version and length stand for them
        return {"model": resolved, "server": server, "record": {**record, "weights_digest": None, "dtype": "server",
                                                                "backend": "server", "server": server["record"]}}
    return {"model": resolved, "server": None, "record": {**record, "weights_digest": weights_digest(resolved),
                                                          "dtype": resolved_dtype(resolved, cfg.dtype)}}


def _settings_for_reuse(settings: dict) -> dict:
    """What must match for existing work to be reused: all but where the prompts file was read and
    where a served model is reached (the same model may move to another host)."""
    kept = {k: v for k, v in settings.items() if k not in ("rows", "dropped", "truncated")}
    kept["prompts"] = {k: v for k, v in settings["prompts"].items() if k != "source"}
    for role in ROLES:
        if isinstance(kept.get(role), dict) and isinstance(kept[role].get("server"), dict):
            kept[role] = {**kept[role], "server": {k: v for k, v in kept[role]["server"].items() if k != "url"}}
    return kept


def _changed(existing: dict, requested: dict) -> list[str]:
    """The guarded settings that differ, as dotted names (sampling.temperature, teacher.weights_digest)."""
    have, want = _settings_for_reuse(existing), _settings_for_reuse(requested)
    names = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            names.append(key)
    return names


class _scratch:
    """A temporary folder beside OUT for the normalised prompts, removed on the way out."""

    def __init__(self, out: Path):
        from dadpo.atomic import temp_path

        self.path = temp_path(out.with_name(out.name + ".prompts"))

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def _refuse_unowned(cfg: GenerateConfig, out: Path, work: Path) -> None:
    """--overwrite replaces OUT and removes OUT.work: only when dadpo generate made them, and never
    what this run reads."""
    reads = [("--prompts", cfg.prompts), ("--teacher", cfg.teacher), ("--student", cfg.student)]
    marker = out.name if out.suffix.lower() == ".parquet" else sidecar_path(out).name
    ensure_owned(out, flag="--out", what="a dadpo generate output", marker=marker,
                 parse=lambda _: _finished_settings(out), removes=[out.resolve(), work.resolve()], protected=reads)
    ensure_owned(work, flag="--out", what="dadpo generate's unfinished work", marker=SETTINGS_NAME,
                 parse=lambda path: read_json_object(path, "generate settings"), removes=[work.resolve()],
                 protected=reads)


def _settings_file(work: Path) -> dict | None:
    try:
        return json.loads((work / SETTINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _open_work(work: Path, settings: dict, overwrite: bool) -> None:
    settings_file = work / SETTINGS_NAME
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)
    if settings_file.exists():
        existing = read_json_object(settings_file, "generate settings")
        if _settings_for_reuse(existing) != _settings_for_reuse(settings):
            raise DadpoError(f"--out: unfinished work in {work} was made with other settings "
                             f"({', '.join(_changed(existing, settings))}); "
                             "re-run with the same flags to finish it, or pass --overwrite to start over")
        return
    if work.exists() and any(work.iterdir()):
        raise DadpoError(f"--out: {work} holds files but no {SETTINGS_NAME}, so it is not dadpo generate's work; "
                         "choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_file, settings)


def _finished_settings(out: Path) -> dict | None:
    if out.suffix.lower() == ".parquet":
        try:
            metadata = pq.read_schema(out).metadata or {}
        except (pa.ArrowException, OSError):
            return None
        raw = metadata.get(METADATA_KEY.encode())
        try:
            settings = json.loads(raw) if raw else None
        except ValueError as exc:
            raise DadpoError(f"{out}: unreadable {METADATA_KEY} metadata ({first_line(exc)})") from None
        return settings if isinstance(settings, dict) else None
    sidecar = sidecar_path(out)
    return read_json_object(sidecar, "dadpo generate sidecar") if sidecar.exists() else None


def _chunk_path(work: Path, role: str, k: int) -> Path:
    return Path(work) / role / f"{k:05d}.parquet"


# ---- one pass: one model over its missing chunks --------------------------------------------------


@dataclass
class _PassJob:
    role: str
    model: ResolvedModel
    work: str
    chunks: list
    cfg: GenerateConfig
    backend: str  # hf, vllm or server
    date: str
    server: dict | None  # served_model_settings' dict when the model is served


def run_pass(job: _PassJob) -> dict:
    """Sample job.role's responses for job.chunks, one part file per chunk."""
    cfg = job.cfg
    tokenizer = model_tokenizer(job.model, f"--{job.role}", no_chat_template=cfg.no_chat_template,
                                template_kwargs=parse_template_kwargs(getattr(cfg, f"{job.role}_template_kwargs"),
                                                                      f"--{job.role}-template-kwargs"),
                                template_date=job.date, trust_remote_code=cfg.trust_remote_code)
    prompts = pl.read_parquet(Path(job.work) / "prompts.parquet", columns=["id", "prompt"])
    engine = make_sampler(job.backend, job.model, tokenizer, cfg.sampling, job.role, cfg.dtype, cfg.engine,
                          cfg.trust_remote_code, job.server)
    progress = Progress(f"generate {job.role} {job.model.name} [{job.backend}]", len(job.chunks), "chunk",
                        cfg.progress)
    responses = tokens = 0
    try:
        for k in progress.each(job.chunks):
            rows = prompts.slice(k * cfg.chunk_size, cfg.chunk_size)
            prompt_ids = []
            for row_id, prompt_json in rows.iter_rows():
                where = f"{cfg.prompts} id '{row_id}' (--{job.role} {job.model.name})"
                prompt_ids.append(tokenizer.encode_prompt(decode_prompt(prompt_json), where))
                engine.check_length(len(prompt_ids[-1]), where)
            outputs = engine.generate(prompt_ids, rows["id"].to_list(), k)  # [(token ids, finish reason)]
            stops = set(tokenizer.stop_ids)
            table = pa.table({
                "id": pa.array(rows["id"].to_list(), pa.string()),
                "response": pa.array([tokenizer.decode([t for t in ids if t not in stops]) for ids, _ in outputs],
                                     pa.string()),
                "token_ids": pa.array([ids for ids, _ in outputs], pa.list_(pa.int32())),
                "finish_reason": pa.array([reason for _, reason in outputs], pa.string()),
            })
            write_parquet_atomic(table, _chunk_path(Path(job.work), job.role, k))
            responses += rows.height
            tokens += sum(len(ids) for ids, _ in outputs)
            progress.tokens(sum(len(ids) for ids, _ in outputs))
    finally:
        progress.close()
        engine.close()
    return {**progress.stats(tokens), "responses": responses, "vocab_digest": tokenizer.vocab}


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
    vocab = {role: settings[role]["vocab_digest"] for role in ROLES}
    prompt_values = [decode_prompt(p) for p in prompts["prompt"]]
    if out.suffix.lower() == ".parquet" and len({type(p) for p in prompt_values}) > 1:
        raise DadpoError(f"--out {out}: the prompts mix raw text and message lists, which one Parquet column cannot "
                         "hold; name the output .jsonl")
    # TRL's conversational preference format (prompt and both responses as message lists), plus
    # each response's sampled ids (pairs v2): cache-teacher scores exactly those.
    frame = pl.concat([pl.DataFrame({
        "id": prompts["id"],
        "prompt": prompt_values,
        "chosen": assistant(teacher["response"]),
        "rejected": assistant(student["response"]),
        "chosen_token_ids": teacher["token_ids"], "chosen_token_ids_vocab": [vocab["teacher"]] * teacher.height,
        "chosen_finish_reason": teacher["finish_reason"],
        "rejected_token_ids": student["token_ids"], "rejected_token_ids_vocab": [vocab["student"]] * student.height,
        "rejected_finish_reason": student["finish_reason"],
    }, strict=False), prompts.drop("id", "prompt")], how="horizontal").filter(keep)
    record = {**settings, "rows": frame.height, "dropped": dropped, "truncated": truncated}
    metadata = json.dumps(record, ensure_ascii=False)
    # The sidecar first: a crash between the two leaves no output, so the re-run redoes the assembly.
    write_json_atomic(sidecar_path(out), record)
    if out.suffix.lower() == ".parquet":
        write_parquet_atomic(frame.to_arrow(), out, metadata={METADATA_KEY: metadata})
    else:
        def write_jsonl(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in frame.iter_rows(named=True):
                    handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

        write_atomic(out, write_jsonl)
    return frame.height, dropped, truncated
