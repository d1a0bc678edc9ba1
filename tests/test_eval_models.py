"""`dadpo eval` with real models: responses generated from tiny models through dadpo's sampling path
(checked against a plain greedy decode) and reused by a run that adds a model; a sweep folder
expanded to its finished points; the answer judge; a real vLLM api_server as the judge.
Cost (measured, 2 cores under load 3-5): 3.9 min of CPU (user + sys), 4.7 min before the vLLM engines
(server, eval's generation pass, the local judge: three code paths) were started lean (support.VLLM_ENV)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from dadpo.config import EvalConfig
from dadpo.engine import EngineOptions
from dadpo.errors import DadpoError
from dadpo.eval.run import evaluate
from support import VLLM_ENV, ScriptedJudge, naive_greedy, write_jsonl

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three."]
MAX_NEW = 6


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": q, "answer": str(i)}
                                                    for i, q in enumerate(QUESTIONS)])


def _stop_ids(model_dir, tokenizer) -> set[int]:
    """Where a response ends, read from the model's own files: the eos ids of the tokenizer and of the
    generation config, and the chat template's end-of-turn token (the special token right after an
    assistant message)."""
    from transformers import GenerationConfig

    stops = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos]) - {None}
    except OSError:
        pass
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "MARKER"}], tokenize=False)
    after = tokenizer(rendered.split("MARKER", 1)[1], add_special_tokens=False)["input_ids"]
    if after and after[0] in tokenizer.all_special_ids:
        stops.add(after[0])
    return stops


def _greedy(model_dir, prompt: str) -> tuple[list[int], str]:
    """An independent greedy decode: the chat template rendered by transformers, argmax per step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = _stop_ids(model_dir, tokenizer)
    out = naive_greedy(model, ids, MAX_NEW, eos)
    return out, tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)


def _config(prompts, out, *models, **changes) -> EvalConfig:
    settings = dict(prompts=str(prompts), baseline=None, model=list(models), judge="answer", backend="hf",
                    dtype="float32", max_new_tokens=MAX_NEW, bootstrap=50, out=str(out), progress=False)
    return EvalConfig(**{**settings, **changes})


def test_generated_responses_match_a_greedy_decode_and_are_reused(models, prompts, tmp_path):
    out = tmp_path / "eval"
    lines = []
    cfg = _config(prompts, out, f"student={models['student']}", baseline=f"teacher={models['teacher']}")
    summary = evaluate(cfg, say=lines.append)
    stored = pl.read_parquet(out / "responses" / "teacher.parquet")
    assert stored["id"].to_list() == [f"q{i}" for i in range(len(QUESTIONS))]
    for i, question in enumerate(QUESTIONS):
        ids, text = _greedy(models["teacher"], question)
        assert stored["token_ids"][i].to_list() == ids
        assert stored["response"][i] == text
    assert summary["models"]["student"]["length_unit"] == "tokens"
    assert sum(1 for line in lines if line.startswith("[")) == 2  # both models generated
    before = {p.name: p.stat().st_mtime_ns for p in (out / "responses").iterdir()}
    lines.clear()
    again = evaluate(_config(prompts, out, f"student={models['student']}", f"b={models['student_b']}",
                             baseline=f"teacher={models['teacher']}"), say=lines.append)
    generating = [line for line in lines if line.startswith("[")]
    assert len(generating) == 1 and " b " in generating[0]  # only the added model
    assert {p.name: p.stat().st_mtime_ns for p in (out / "responses").iterdir() if p.name in before} == before
    assert again["models"]["student"] == summary["models"]["student"]
    # other sampling settings for a kept model: refused with one line naming the setting
    with pytest.raises(DadpoError, match="sampling"):
        evaluate(_config(prompts, out, f"student={models['student']}", baseline=f"teacher={models['teacher']}",
                         max_new_tokens=MAX_NEW + 1), say=lines.append)


def test_answer_judge_by_hand(prompts, tmp_path):
    base = write_jsonl(tmp_path / "b.jsonl", [{"id": "q0", "response": "#### 0"}, {"id": "q1", "response": "1"},
                                              {"id": "q2", "response": "no idea"}, {"id": "q3", "response": "7"}])
    cand = write_jsonl(tmp_path / "c.jsonl", [{"id": "q0", "response": "so 0"}, {"id": "q1", "response": "2"},
                                              {"id": "q2", "response": "it is 2"}, {"id": "q3", "response": "3"}])
    summary = evaluate(_config(prompts, tmp_path / "eval", f"c={cand}", baseline=f"b={base}"), say=lambda x: None)
    got = summary["models"]["c"]
    # q0 both right (tie), q1 only the baseline (loss), q2 and q3 only the model (wins)
    assert (got["win"], got["tie"], got["loss"], got["parse_failures"]) == (2, 1, 1, 0)
    assert got["win_rate"] == pytest.approx(2.5 / 4)
    assert got["accuracy"] == pytest.approx(3 / 4) and summary["baseline_accuracy"] == pytest.approx(2 / 4)
    assert got["position_consistency"] is None


def test_a_sweep_folder_expands_to_its_finished_points(models, tmp_path):
    runs = tmp_path / "runs"
    for name, finished in (("b1=0.1_b2=0.01", True), ("b1=0.1_b2=0", True), ("b1=0.2_b2=0.01", False)):
        shutil.copytree(models["student"], runs / name / "model")
        if finished:
            (runs / name / "summary.json").write_text(json.dumps({"steps": 1}))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"}, {"id": "b", "prompt": "Bye"}])
    judge_replies = lambda prompt, payload: "[[A]]"  # noqa: E731
    with ScriptedJudge(judge_replies) as judge:
        summary = evaluate(EvalConfig(prompts=str(prompts), baseline=f"teacher={models['teacher']}",
                                      model=[str(runs)], judge_url=judge.url, judge_model="j", backend="hf",
                                      dtype="float32", max_new_tokens=4, bootstrap=20, out=str(tmp_path / "eval"),
                                      progress=False), say=lambda x: None)
    assert sorted(summary["models"]) == ["b1=0.1_b2=0", "b1=0.1_b2=0.01"]
    assert (tmp_path / "eval" / "sweep_heatmap.png").exists()
    assert len(judge.received) == 2 * 2 * 2


@pytest.mark.vllm
def test_a_real_vllm_server_as_the_judge(vllm_server, vllm_ready, tmp_path, monkeypatch):
    """A random tiny model rarely writes [[A]]/[[B]]/[[C]]: its replies are parse failures, never losses.
    The server runs with --api-key (the shared fixture): the key goes through --judge-api-key-env."""
    monkeypatch.setenv(vllm_server["key_env"], vllm_server["api_key"])
    ids = [f"p{i}" for i in range(3)]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": f"Question {i}"} for i in ids])
    base = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "response": "baseline"} for i in ids])
    cand = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "response": "candidate"} for i in ids])
    template = tmp_path / "t.jinja"
    template.write_text("Q {{ question }} A {{ answer_a }} B {{ answer_b }} [[A]] [[B]] [[C]]?")
    summary = evaluate(EvalConfig(prompts=str(prompts), baseline=f"base={base}", model=[f"c={cand}"],
                                  judge_url=vllm_server["url"] + "/v1", judge_model=vllm_server["model"],
                                  judge_api_key_env=vllm_server["key_env"], judge_template=str(template),
                                  judge_retries=1, judge_max_new_tokens=8,
                                  bootstrap=20, out=str(tmp_path / "eval"), progress=False), say=lambda x: None)
    got = summary["models"]["c"]
    table = pl.read_parquet(tmp_path / "eval" / "judgments.parquet")
    assert table.height == 6 and table["reply"].null_count() == 0
    from dadpo.eval.verdicts import order_outcome, parse_verdict

    verdicts = {(r["id"], r["order"]): parse_verdict(r["reply"]) for r in table.iter_rows(named=True)}
    assert [r["verdict"] for r in table.iter_rows(named=True)] == [verdicts[(r["id"], r["order"])]
                                                                   for r in table.iter_rows(named=True)]
    # unparsed replies were asked again once (2 attempts), parsed ones not
    assert all((r["attempts"] == 2) == (r["verdict"] is None) for r in table.iter_rows(named=True))
    outcomes = [order_outcome(verdicts[(i, "AB")], verdicts[(i, "BA")]) for i in ids]
    assert got["parse_failures"] == sum(o is None for o in outcomes)
    assert got["loss"] == sum(o == 0.0 for o in outcomes)
    assert got["win"] + got["tie"] + got["loss"] + got["parse_failures"] == 3
    assert (got["win_rate"] is None) == all(o is None for o in outcomes)
    assert np.isfinite(got["parse_failures"])


def test_a_local_causal_lm_judge_greedy_then_parse_failures(models, tmp_path):
    """--judge PATH (hf): each order's prompt through the judge's chat template, greedy; a random tiny
    judge writes no verdict, so every prompt is a parse failure and there is no rate (not 0)."""
    from dadpo.eval.verdicts import load_judge_template, render_judge_prompt

    ids = ["a", "b"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": f"Question {i}"} for i in ids])
    base = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "response": f"base {i}"} for i in ids])
    cand = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "response": f"cand {i}"} for i in ids])
    summary = evaluate(EvalConfig(prompts=str(prompts), baseline=f"base={base}", model=[f"c={cand}"],
                                  judge=str(models["teacher"]), judge_retries=0, judge_max_new_tokens=MAX_NEW,
                                  backend="hf", dtype="float32", bootstrap=20, out=str(tmp_path / "eval"),
                                  progress=False), say=lambda x: None)
    got = summary["models"]["c"]
    assert (got["win"], got["tie"], got["loss"], got["parse_failures"]) == (0, 0, 0, 2)
    assert got["win_rate"] is None and got["ci95"] is None
    assert summary["judge"]["kind"] == "local" and summary["judge"]["weights_digest"]
    table = pl.read_parquet(tmp_path / "eval" / "judgments.parquet")
    template = load_judge_template(None)
    for r in table.iter_rows(named=True):
        a, b = (f"cand {r['id']}", f"base {r['id']}") if r["order"] == "AB" else (f"base {r['id']}", f"cand {r['id']}")
        _, text = _greedy(models["teacher"], render_judge_prompt(template, f"Question {r['id']}", a, b))
        assert r["reply"] == text and r["verdict"] is None and r["attempts"] == 1


@pytest.mark.vllm
def test_vllm_generated_responses_match_a_greedy_decode(vllm_ready, models, prompts, tmp_path):
    """`dadpo eval --backend vllm`: each model's engine in its own process; greedy ids as a plain decode's."""
    from support import run_cli

    out = tmp_path / "eval"
    base = write_jsonl(tmp_path / "b.jsonl", [{"id": f"q{i}", "response": "0"} for i in range(len(QUESTIONS))])
    args = ["eval", "--prompts", prompts, "--baseline", f"b={base}", "--model", f"teacher={models['teacher']}",
            "--judge", "answer", "--backend", "vllm", "--dtype", "float32", "--max-new-tokens", MAX_NEW,
            "--bootstrap", "20", "--out", out, "--vllm-arg", "enforce_eager=true"]  # eager: no graph compilation
    result = run_cli(*args, env=VLLM_ENV, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = pl.read_parquet(out / "responses" / "teacher.parquet")
    same = sum(stored["token_ids"][i].to_list() == _greedy(models["teacher"], q)[0] for i, q in enumerate(QUESTIONS))
    assert same >= len(QUESTIONS) - 1  # fp32 on CPU: greedy paths agree unless two logits tie within rounding
    again = run_cli(*args, env=VLLM_ENV)
    assert again.returncode == 0 and "generating" not in again.stdout, again.stdout
    # an engine argument vLLM does not take: one line before any model runs, nothing written
    wrong = run_cli(*args[:args.index("--out")], "--out", tmp_path / "wrong", "--vllm-arg", "enforce_eagre=true",
                    env=VLLM_ENV)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "--vllm-arg: enforce_eagre: not an argument of vllm.LLM" in wrong.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "wrong").exists()


def test_a_reward_model_judge(tmp_path):
    """--judge REWARD_MODEL: per prompt sigma(r_model - r_baseline) from the rewards of each (prompt,
    response), here recomputed with the reward model directly; no position terms."""
    import dadpo.tiny

    build = getattr(dadpo.tiny, "build_tiny_reward_model", None)
    if build is None:
        pytest.skip("dadpo.tiny has no tiny reward model builder in this tree")
    from dadpo.eval.reward import RewardModel

    judge = build(tmp_path / "rm", family="teacher", seed=4)
    ids = ["a", "b", "c"]
    questions = {i: f"Question {i}" for i in ids}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": questions[i]} for i in ids])
    base = {i: f"base answer {i}" for i in ids}
    cand = {i: f"a longer candidate answer {i}" for i in ids}
    base_file = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "response": base[i]} for i in ids])
    cand_file = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "response": cand[i]} for i in ids])
    summary = evaluate(EvalConfig(prompts=str(prompts), baseline=f"base={base_file}", model=[f"c={cand_file}"],
                                  judge=str(judge), engine=EngineOptions(device="cpu"), dtype="float32", bootstrap=20,
                                  out=str(tmp_path / "eval"), progress=False), say=lambda x: None)
    model = RewardModel(str(judge), device="cpu", dtype="float32")
    r_c = model.rewards([questions[i] for i in ids], [cand[i] for i in ids])
    r_b = model.rewards([questions[i] for i in ids], [base[i] for i in ids])
    model.close()
    expected = 1 / (1 + np.exp(-(r_c - r_b)))
    got = summary["models"]["c"]
    assert got["win_rate"] == pytest.approx(expected.mean(), rel=1e-6)
    assert got["win"] == int((expected > 0.5).sum()) and got["loss"] == int((expected < 0.5).sum())
    assert got["position_consistency"] is None and summary["judge"]["kind"] == "reward"
    table = pl.read_parquet(tmp_path / "eval" / "judgments.parquet")
    assert set(table["order"]) == {"reward"} and table.height == 6


@pytest.mark.vllm
def test_a_local_judge_on_vllm(vllm_ready, models, tmp_path):
    """--judge PATH --backend vllm: the judge's engine in the eval's process, greedy replies as a plain decode's."""
    from dadpo.eval.verdicts import load_judge_template, render_judge_prompt
    from support import run_cli

    ids = ["a", "b"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": f"Question {i}"} for i in ids])
    base = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "response": f"base {i}"} for i in ids])
    cand = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "response": f"cand {i}"} for i in ids])
    out = tmp_path / "eval"
    result = run_cli("eval", "--prompts", prompts, "--baseline", f"base={base}", "--model", f"c={cand}", "--judge",
                     models["teacher"], "--backend", "vllm", "--dtype", "float32", "--judge-retries", "0",
                     "--judge-max-new-tokens", MAX_NEW, "--bootstrap", "20", "--out", out,
                     "--vllm-arg", "enforce_eager=true", env=VLLM_ENV, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pl.read_parquet(out / "judgments.parquet")
    template = load_judge_template(None)
    same = 0
    for r in table.iter_rows(named=True):
        a, b = (f"cand {r['id']}", f"base {r['id']}") if r["order"] == "AB" else (f"base {r['id']}", f"cand {r['id']}")
        same += r["reply"] == _greedy(models["teacher"], render_judge_prompt(template, f"Question {r['id']}", a, b))[1]
    assert table.height == 4 and same >= 3  # fp32 on CPU: greedy paths agree unless two logits tie within rounding
    assert json.loads((out / "summary.json").read_text())["models"]["c"]["parse_failures"] == 2


def test_lm_eval_on_every_model_against_the_baseline(models, prompts, tmp_path, datasets_cache):
    """--lm-eval-tasks on a local YAML task: each model's metric (as lm-eval gives it for that model alone),
    the baseline's, the difference; kept in EVAL/lm_eval/ so a re-run does not compute it again."""
    pytest.importorskip("lm_eval")
    from dadpo.eval.harness import run_lm_eval

    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": k % 2}
            for k, (a, b) in enumerate([(1, 2), (3, 4), (2, 2), (5, 1)])]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "mc.jsonl", rows)
    (tasks / "tiny_mc.yaml").write_text(
        "task: dadpo_eval_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    cfg = _config(prompts, tmp_path / "eval", f"student={models['student']}", baseline=f"teacher={models['teacher']}",
                  lm_eval_tasks="dadpo_eval_tiny_mc", lm_eval_include=str(tasks))
    summary = evaluate(cfg, say=lambda x: None)
    got = summary["models"]["student"]["lm_eval"]["dadpo_eval_tiny_mc"]
    alone = {name: run_lm_eval(str(models[name]), ["dadpo_eval_tiny_mc"], limit=None, fewshot=None,
                               include_path=str(tasks), dtype="float32")["dadpo_eval_tiny_mc"]
             for name in ("student", "teacher")}
    assert got["value"] == pytest.approx(alone["student"]["value"])
    assert got["baseline_value"] == pytest.approx(alone["teacher"]["value"])
    assert got["difference"] == pytest.approx(alone["student"]["value"] - alone["teacher"]["value"])
    assert summary["baseline_lm_eval"]["dadpo_eval_tiny_mc"]["value"] == pytest.approx(alone["teacher"]["value"])
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "lm_eval").iterdir()}
    assert evaluate(cfg, say=lambda x: None)["models"]["student"]["lm_eval"] == summary["models"]["student"]["lm_eval"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "lm_eval").iterdir()} == kept
