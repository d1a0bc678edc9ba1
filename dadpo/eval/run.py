"""`dadpo eval`: responses per model, one judge over both orders, statistics against the baseline.

    evaluate(cfg)   check flags -> EVAL/settings.json guard -> responses (made once, reused)
                    -> the judgments still missing (kept as they complete) -> lm-eval (optional)
                    -> judgments.parquet, summary.json (validated), summary.md, winrates.png,
                       and a (beta1, beta2) heatmap per sweep folder (dadpo.eval.results)

Every step can be interrupted (kill -9, a stop signal, a judge server that dies) and the same
command continues: finished responses and judgments are read back and never asked for again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dadpo import stop
from dadpo.atomic import write_json_atomic
from dadpo.config import EvalConfig, Sampling
from dadpo.errors import DadpoError
from dadpo.eval import responses as resp
from dadpo.eval.judges import JudgeRequest, LocalJudge, RewardJudge, ServedJudge, api_key_from_env, row
from dadpo.eval.prompts import EvalPrompts, load_eval_prompts
from dadpo.eval.results import build_summary, write_outputs
from dadpo.eval.store import FORMAT, JudgmentStore, open_eval
from dadpo.scoring.client import check_server_flags

ORDERS = ("AB", "BA")  # AB: the model's response is answer A, the baseline's answer B


@dataclass
class _Plan:
    cfg: EvalConfig
    out: Path
    prompts: EvalPrompts
    baseline: resp.ModelSpec
    models: list
    judge_kind: str  # served, local, reward, answer
    template: object | None  # JudgeTemplate for LM judges
    date: str


def evaluate(cfg: EvalConfig, say: Callable[[str], None] = print) -> dict:
    """Run (or continue) the eval in cfg.out and return its summary (the content of summary.json)."""
    started = time.monotonic()
    judge_kind = _check_flags(cfg)
    api_key = api_key_from_env(cfg.judge_api_key_env) if judge_kind == "served" else (None, None)
    out = Path(cfg.out)
    from dadpo.eval.verdicts import load_judge_template

    template = load_judge_template(cfg.judge_template) if judge_kind in ("served", "local") else None
    baseline, models = resp.model_specs(cfg.baseline, cfg.model)
    prompts = load_eval_prompts(cfg.prompts)
    if judge_kind == "answer":
        _check_answers(prompts)
    existing = _read_settings(out)
    date = cfg.template_date or (existing or {}).get("template_date") or _today()
    with stop.handling():
        judge = _make_judge(cfg, judge_kind, api_key, date)
        judge.probe()
        settings = {"format": FORMAT, "template_date": date,
                    "baseline": {"name": baseline.name, "source": _source_id(baseline)},
                    # the URL is left out: the same judge restarted elsewhere continues the eval
                    "judge": {**{k: v for k, v in judge.record().items() if k != "url"},
                              "template": template.name if template else None,
                              "template_digest": template.digest if template else None},
                    "prompts": {"digest": prompts.digest, "count": len(prompts)}}
        reads = {"--prompts": cfg.prompts, **{f"{m.flag} {m.name}": m.source for m in (baseline, *models)},
                 **({"--judge": cfg.judge} if judge_kind in ("local", "reward") else {})}
        open_eval(out, settings, cfg.overwrite, reads)
        plan = _Plan(cfg, out, prompts, baseline, models, judge_kind, template, date)
        sets = _responses(plan, say)
        store = JudgmentStore(out)
        before = len(store.rows)
        _judge(plan, judge, sets, store, say)
        made = len(store.rows) - before
        lm_eval = _lm_eval(plan, say) if cfg.lm_eval_tasks else None
    store.finish()
    summary = build_summary(plan, {**judge.record(), **settings["judge"]}, sets, store, lm_eval)
    write_outputs(plan, summary)
    from dadpo.eval.report import render_table

    table = render_table(summary)
    say(table.rstrip("\n"))
    say(f"{out}: {made} new judgments, {len(store.rows) - made} kept from earlier ({time.monotonic() - started:.1f} s)")
    return summary


# ---- flags ---------------------------------------------------------------------------------------


def _check_flags(cfg: EvalConfig) -> str:
    """Which judge (served, local, reward, answer); bad flags are one line."""
    from dadpo.modeling import check_device, torch_dtype
    from dadpo.tokenization import check_date

    if cfg.judge_url and cfg.judge:
        raise DadpoError("--judge-url and --judge: give one judge")
    if not cfg.judge_url and not cfg.judge:
        raise DadpoError("no judge: give --judge-url URL --judge-model NAME, --judge PATH, or --judge answer")
    if cfg.judge_url and not cfg.judge_model:
        raise DadpoError(f"--judge-url {cfg.judge_url}: also give --judge-model (the name the server serves)")
    if cfg.judge_api_key_env and not cfg.judge_url:
        raise DadpoError("--judge-api-key-env: only for --judge-url")
    check_server_flags(cfg.judge_concurrency, cfg.judge_timeout, cfg.judge_retries, prefix="--judge")
    for flag, value, least in (("--judge-max-new-tokens", cfg.judge_max_new_tokens, 1),
                               ("--bootstrap", cfg.bootstrap, 1), ("--max-new-tokens", cfg.max_new_tokens, 1),
                               ("--batch-size", cfg.engine.batch_size, 1)):
        if value < least:
            raise DadpoError(f"{flag} {value}: must be at least {least}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise DadpoError(f"--temperature {cfg.temperature}: must be >= 0 (0 is greedy decoding)")
    if cfg.lm_eval_limit is not None and cfg.lm_eval_limit < 1:
        raise DadpoError(f"--lm-eval-limit {cfg.lm_eval_limit}: must be at least 1")
    if cfg.lm_eval_tasks is not None:
        from dadpo.eval.harness import require_lm_eval

        require_lm_eval()
    check_date(cfg.template_date)
    torch_dtype(cfg.dtype)
    check_device(cfg.engine.device)
    if cfg.engine.extra and _backend(cfg) == "vllm":
        from dadpo.engine import check_vllm_args

        check_vllm_args(cfg.engine.extra)  # before any model runs, not in the first engine's process
    if cfg.judge == "answer":
        if cfg.judge_template:
            raise DadpoError("--judge-template: the answer judge reads no prompt")
        return "answer"
    if cfg.judge_url:
        return "served"
    from dadpo.eval.reward import is_reward_model

    return "reward" if is_reward_model(cfg.judge) else "local"


def _check_answers(prompts: EvalPrompts) -> None:
    if prompts.answers is None:
        raise DadpoError(f"--judge answer: --prompts {prompts.path} has no 'answer' column")
    for row_id, answer in zip(prompts.ids, prompts.answers):
        if answer is None or not answer.strip():
            raise DadpoError(f"--judge answer: --prompts {prompts.path} id {row_id!r} has no answer")


def _today() -> str:
    from dadpo.tokenization import today

    return today()


def _read_settings(out: Path) -> dict | None:
    try:
        return json.loads((out / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _source_id(spec: resp.ModelSpec) -> str:
    """How the guard names a baseline: a file's or folder's absolute path, or the hub id."""
    path = Path(spec.source)
    return str(path.resolve()) if path.exists() else spec.source


def _engine(cfg: EvalConfig):
    import dataclasses

    return dataclasses.replace(cfg.engine, seed=cfg.seed)  # one --seed for sampling and the engine


def _backend(cfg: EvalConfig) -> str:
    from dadpo.scoring import pick_backend

    return pick_backend(cfg.backend)


def _make_judge(cfg: EvalConfig, kind: str, api_key: tuple[str | None, str | None], date: str):
    if kind == "served":
        return ServedJudge(cfg.judge_url, cfg.judge_model, api_key=api_key[0],
                           key_source=api_key[1] or "--judge-api-key-env VAR",
                           retries=cfg.judge_retries, concurrency=cfg.judge_concurrency, timeout_s=cfg.judge_timeout,
                           max_new_tokens=cfg.judge_max_new_tokens, seed=cfg.seed)
    if kind == "answer":
        return _AnswerJudge()
    if kind == "reward":
        return RewardJudge(cfg.judge, device=cfg.engine.device, dtype=cfg.dtype, date=date)
    return LocalJudge(cfg.judge, retries=cfg.judge_retries, max_new_tokens=cfg.judge_max_new_tokens,
                      backend=_backend(cfg), dtype=cfg.dtype, engine=_engine(cfg), seed=cfg.seed,
                      trust_remote_code=cfg.trust_remote_code, date=date)


class _AnswerJudge:
    kind = "answer"

    def record(self) -> dict:
        return {"kind": "answer", "model": None, "url": None, "max_new_tokens": None, "weights_digest": None}

    def probe(self) -> None:
        pass


# ---- responses -----------------------------------------------------------------------------------


def _template_kwargs(cfg: EvalConfig, names: list[str]) -> dict[str, dict]:
    """--template-kwargs [NAME=]JSON -> {model name: variables}; no NAME: every model."""
    from dadpo.tokenization import parse_template_kwargs

    shared: dict = {}
    named: dict[str, dict] = {}
    for text in cfg.template_kwargs:
        name, sep, rest = text.partition("=")
        if sep and not text.lstrip().startswith("{"):
            if name not in names:
                raise DadpoError(f"--template-kwargs {text}: no model is named {name!r} "
                                 f"(models: {', '.join(names)})")
            named[name] = parse_template_kwargs(rest, f"--template-kwargs {name}")
        else:
            shared = parse_template_kwargs(text, "--template-kwargs")
    return {name: {**shared, **named.get(name, {})} for name in names}


def _responses(plan: _Plan, say) -> dict[str, resp.ResponseSet]:
    """Every model's responses (the baseline's first), generated where missing."""
    from dadpo.runner import call_isolated

    cfg, specs = plan.cfg, [plan.baseline, *plan.models]
    kwargs = _template_kwargs(cfg, [s.name for s in specs])
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    sets: dict[str, resp.ResponseSet] = {}
    jobs = []
    backend = None
    for spec in specs:
        if spec.is_file:
            sets[spec.name] = resp.from_file(spec, plan.prompts, plan.out)
            continue
        backend = backend or _backend(cfg)
        model, settings = resp.generation_settings(spec, plan.prompts, sampling, backend, cfg.dtype,
                                                   kwargs[spec.name], plan.date, cfg.trust_remote_code)
        path = resp.responses_path(plan.out, spec.name)
        stored, _ = resp.read_stored(path)
        if resp.guard(path, stored, settings, spec):
            continue
        jobs.append(resp.GenerationJob(spec.name, spec, model, plan.prompts.prompts, plan.prompts.ids, sampling,
                                       backend, cfg.dtype, _engine(cfg), kwargs[spec.name], plan.date,
                                       cfg.trust_remote_code, str(path), settings))
    for number, job in enumerate(jobs, 1):
        say(f"[{number}/{len(jobs)}] generating {len(plan.prompts)} responses of {job.spec.name} ({job.spec.source}) "
            f"[{job.backend}]")
        try:
            # vLLM does not give all memory back in-process: each model's engine gets its own process
            call_isolated(resp.generate_job, job) if job.backend == "vllm" else resp.generate_job(job)
        except Exception:
            stop.raise_if_requested()
            raise
        stop.raise_if_requested()
    for spec in specs:
        if spec.name not in sets:
            sets[spec.name] = resp.stored_set(spec, plan.out)
    return sets


# ---- judging -------------------------------------------------------------------------------------


def _judge(plan: _Plan, judge, sets: dict, store: JudgmentStore, say) -> None:
    base = sets[plan.baseline.name]
    names = [m.name for m in plan.models]
    if plan.judge_kind == "answer":
        rows = []
        for name in [plan.baseline.name, *names]:
            for i, row_id in enumerate(plan.prompts.ids):
                key = (row_id, name, "answer")
                if not store.done(key):
                    rows.append(_answer_row(key, sets[name].responses[i], plan.prompts.answers[i]))
        store.append(rows)
        return
    if plan.judge_kind == "reward":
        items = [((row_id, name, "reward"), plan.prompts.prompts[i], sets[name].responses[i])
                 for name in [plan.baseline.name, *names] for i, row_id in enumerate(plan.prompts.ids)
                 if not store.done((row_id, name, "reward"))]
        if items:
            say(f"judging: {len(items)} rewards to compute")
        judge.run(items, _keeping(store, len(items), say if plan.cfg.progress else None))
        return
    from dadpo.eval.verdicts import render_judge_prompt

    requests = []
    for name in names:
        cand = sets[name]
        for i, row_id in enumerate(plan.prompts.ids):
            question = plan.prompts.question(i)
            for order in ORDERS:
                key = (row_id, name, order)
                if store.done(key):
                    continue
                a, b = (cand.responses[i], base.responses[i]) if order == "AB" else \
                    (base.responses[i], cand.responses[i])
                requests.append(JudgeRequest(key, render_judge_prompt(plan.template, question, a, b)))
    if requests:
        say(f"judging: {len(requests)} judgments to make ({len(store.rows)} kept from earlier)")
    judge.run(requests, _keeping(store, len(requests), say if plan.cfg.progress else None))


def _keeping(store: JudgmentStore, total: int, say, every_s: float = 30.0):
    """store.append, and a progress line at most every `every_s` seconds (logs stay readable)."""
    state = {"done": 0, "started": time.monotonic(), "last": time.monotonic()}

    def keep(rows: list[dict]) -> None:
        store.append(rows)
        state["done"] += len(rows)
        now = time.monotonic()
        if say is not None and now - state["last"] >= every_s:
            state["last"] = now
            rate = state["done"] / max(now - state["started"], 1e-9)
            say(f"judging: {state['done']}/{total} done, {rate:.1f} judgments/s")

    return keep


def _answer_row(key, response: str, answer: str) -> dict:
    from dadpo.eval.answer import answers_match, extract_final_answer

    matched = answers_match(response, answer)
    return row(key, extract_final_answer(response), "match" if matched else "no match", 1, 1.0 if matched else 0.0)


# ---- lm-eval -------------------------------------------------------------------------------------


def _lm_eval(plan: _Plan, say) -> dict[str, dict]:
    """{model name: {task: result}} for the baseline and every generated model, each kept in
    EVAL/lm_eval/NAME.json (with its settings) so a re-run does not compute it again."""
    from dadpo.eval.harness import run_lm_eval

    cfg = plan.cfg
    tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    if not tasks:
        raise DadpoError(f"--lm-eval-tasks {cfg.lm_eval_tasks!r}: no task named")
    backend = "vllm" if cfg.backend == "vllm" else "hf"
    # what can change a score: a kept result is reused only under the same settings
    settings = {"tasks": tasks, "limit": cfg.lm_eval_limit, "fewshot": cfg.lm_eval_fewshot,
                "include": cfg.lm_eval_include, "dtype": cfg.dtype, "seed": cfg.seed, "backend": backend,
                "max_model_len": cfg.engine.max_model_len, "vllm_args": cfg.engine.extra}
    results = {}
    for spec in [plan.baseline, *plan.models]:
        if spec.is_file:
            continue  # a responses file has no model to run
        path = plan.out / "lm_eval" / f"{spec.name}.json"
        kept = _read_json(path)
        if kept and kept.get("settings") == settings and kept.get("source") == _source_id(spec):
            results[spec.name] = kept["results"]
            continue
        say(f"lm-eval {','.join(tasks)} on {spec.name}")
        found = run_lm_eval(spec.source, tasks, limit=cfg.lm_eval_limit, fewshot=cfg.lm_eval_fewshot, backend=backend,
                            engine=_engine(cfg), dtype=cfg.dtype, include_path=cfg.lm_eval_include,
                            seed=cfg.seed)
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, {"settings": settings, "source": _source_id(spec), "results": found})
        results[spec.name] = found
        stop.raise_if_requested()
    return results


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
