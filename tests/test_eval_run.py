"""`dadpo eval` end to end against a scripted judge: a real HTTP server whose replies the test
writes, so every count and rate in the summary is known by hand; crash safety (a judge that dies,
kill -9, a stop signal) with the requests counted at the server; the settings guard; bad inputs."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import polars as pl
import pytest

from dadpo.config import EvalConfig
from dadpo.errors import DadpoError
from dadpo.eval.run import evaluate
from dadpo.stop import EXIT_STOPPED
from support import ScriptedJudge, assert_one_line_error, free_port, kill_when, run_cli, start_cli, write_jsonl

IDS = [f"p{i}" for i in range(8)]
# what the scripted judge thinks of each prompt: the rule is applied to whichever answer comes first
RULES = {"p0": "cand", "p1": "cand", "p4": "cand", "p2": "base", "p3": "first", "p5": "first", "p6": "none",
         "p7": "tie"}


def verdict_for(prompt: str, model: str = "CAND") -> str:
    """The scripted judge: find the prompt id and which answer (A or B) is the model's."""
    row_id = re.search(r"BASE-(p\d+)", prompt).group(1)
    a_is_model = prompt.index(f"{model}-{row_id}") < prompt.index(f"BASE-{row_id}")
    rule = RULES[row_id]
    if rule == "none":
        return "I cannot decide between them."
    if rule == "first":
        return "Both fine. [[A]]"
    if rule == "tie":
        return "Equal. [[C]]"
    prefer_a = (rule == "cand") == a_is_model
    return f"Explanation: [[B]] would be wrong... final: [[{'A' if prefer_a else 'B'}]]"


def scripted(prompt: str, payload: dict) -> str:
    model = "OTHER" if "OTHER-" in prompt else "CAND"
    return verdict_for(prompt, model)


@pytest.fixture
def files(tmp_path) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": i, "prompt": f"Question {i}?", "category": "x" if int(i[1:]) < 4 else "y"}
                           for i in IDS])
    return {"prompts": prompts,
            "base": write_jsonl(tmp_path / "base.jsonl", [{"id": i, "response": f"BASE-{i} says hi"} for i in IDS]),
            "cand": write_jsonl(tmp_path / "cand.jsonl", [{"id": i, "response": f"CAND-{i} answers"} for i in IDS]),
            "other": write_jsonl(tmp_path / "other.jsonl", [{"id": i, "response": f"OTHER-{i}"} for i in IDS]),
            "out": tmp_path / "eval"}


def config(files, judge: ScriptedJudge, *models, **changes) -> EvalConfig:
    settings = dict(prompts=str(files["prompts"]), baseline=f"teacher={files['base']}",
                    model=list(models) or [f"cand={files['cand']}"], judge_url=judge.url, judge_model="scripted",
                    judge_retries=2, judge_concurrency=4, bootstrap=200, out=str(files["out"]), progress=False)
    return EvalConfig(**{**settings, **changes})


def test_statistics_by_hand_both_orders_and_parse_failures(files):
    with ScriptedJudge(scripted) as judge:
        summary = evaluate(config(files, judge), say=lambda line: None)
    got = summary["models"]["cand"]
    # p0 p1 p4 win (both orders prefer the model); p2 loss; p3 p5 ties by position bias ([[A]] twice);
    # p7 a tie both orders agree on; p6 no verdict in any of 1 + 2 tries per order: a parse failure
    assert (got["win"], got["tie"], got["loss"], got["parse_failures"]) == (3, 3, 1, 1)
    assert got["win_rate"] == pytest.approx((3 + 3 / 2) / 7)
    assert got["position_consistency"] == pytest.approx(5 / 7)
    assert got["ci95"][0] <= got["win_rate"] <= got["ci95"][1]
    assert got["by_category"]["x"]["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert got["by_category"]["y"]["win_rate"] == pytest.approx((1 + 1) / 3)
    assert got["length_unit"] == "characters"  # responses files: no tokens known
    assert got["mean_length"] == pytest.approx(sum(len(f"CAND-{i} answers") for i in IDS) / 8)
    # both orders of every prompt were sent; p6 three times per order, the re-asks at temperature 0.7
    sent = [(re.search(r"BASE-(p\d+)", p["messages"][-1]["content"]).group(1),
             p["messages"][-1]["content"].index("CAND") < p["messages"][-1]["content"].index("BASE"), p["temperature"])
            for p in judge.received]
    assert len(sent) == 16 + 4
    assert sorted((i, a) for i, a, t in sent if t == 0) == sorted((i, a) for i in IDS for a in (True, False))
    assert sorted((i, t) for i, a, t in sent if t) == [("p6", 0.7)] * 4
    assert all(p["model"] == "scripted" for p in judge.received)
    out = files["out"]
    table = pl.read_parquet(out / "judgments.parquet")
    assert table.height == 16 and set(table["order"]) == {"AB", "BA"}
    failed = table.filter(pl.col("id") == "p6")
    assert failed["verdict"].to_list() == [None, None] and failed["attempts"].to_list() == [3, 3]
    assert failed["reply"].to_list() == ["I cannot decide between them."] * 2
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["models"]["cand"]["win"] == 3 and on_disk["baseline"] == "teacher"
    assert on_disk["judge"]["kind"] == "served" and on_disk["judge"]["model"] == "scripted"
    assert (out / "summary.md").exists() and (out / "winrates.png").exists()
    assert not list((out / "work").glob("judgments-*"))


def test_rerun_sends_nothing_and_an_added_model_only_its_own(files):
    with ScriptedJudge(scripted) as judge:
        first = evaluate(config(files, judge), say=lambda line: None)
        sent = len(judge.received)
        again = evaluate(config(files, judge), say=lambda line: None)
        assert len(judge.received) == sent  # a finished eval sends nothing
        assert again["models"] == first["models"]
        both = evaluate(config(files, judge, f"cand={files['cand']}", f"other={files['other']}"), say=lambda line: None)
    new = judge.received[sent:]
    assert len(new) == 16 + 4 and all("OTHER-" in p["messages"][-1]["content"] for p in new)
    assert both["models"]["cand"] == first["models"]["cand"]
    assert both["models"]["other"]["win"] == 3


def test_a_judge_that_dies_mid_run_then_resume_repeats_nothing(files):
    always = lambda prompt, payload: "[[C]]"  # noqa: E731
    with ScriptedJudge(always, die_after=5) as dying:
        with pytest.raises(DadpoError, match="finished judgments are kept"):
            evaluate(config(files, dying, judge_retries=1), say=lambda line: None)
    kept = pl.concat([pl.read_parquet(p) for p in (files["out"] / "work").glob("judgments-*.parquet")])
    assert kept.height == 5  # every answer the server gave was kept
    with ScriptedJudge(always) as judge:  # restarted, at another port: the URL is not part of the guard
        summary = evaluate(config(files, judge, judge_retries=1), say=lambda line: None)
    assert not set(dying.answered) & {p["messages"][-1]["content"] for p in judge.received}
    assert len(dying.answered) + len(judge.received) == 16
    assert summary["models"]["cand"]["tie"] == 8


def _eval_args(files, judge, *extra) -> list:
    return ["eval", "--prompts", files["prompts"], "--baseline", f"teacher={files['base']}", "--model",
            f"cand={files['cand']}", "--judge-url", judge.url, "--judge-model", "scripted", "--bootstrap", "50",
            "--out", files["out"], *extra]


def _kept_judgments(out: Path) -> int:
    return sum(pl.read_parquet(p).height for p in (out / "work").glob("judgments-*.parquet"))


def test_kill_9_mid_run_then_resume_repeats_no_kept_judgment(files):
    with ScriptedJudge(lambda prompt, payload: "[[A]]", delay_s=0.2) as judge:
        process = start_cli(*_eval_args(files, judge, "--judge-concurrency", "2"))
        assert kill_when(process, lambda: _kept_judgments(files["out"]) >= 4)
        kept = _kept_judgments(files["out"])
        first = len(judge.received)
        summary = evaluate(config(files, judge, judge_concurrency=2), say=lambda line: None)
    resent = judge.received[first:]
    # only the judgments not kept are asked again (those in flight at the kill among them)
    assert len(resent) == 16 - kept
    assert summary["models"]["cand"]["tie"] == 8


def test_stop_signal_exits_75_with_one_line_and_resumes(files):
    with ScriptedJudge(lambda prompt, payload: "[[B]] [[A]]", delay_s=0.2) as judge:
        process = start_cli(*_eval_args(files, judge, "--judge-concurrency", "2"))
        from support import signal_when

        assert signal_when(process, lambda: _kept_judgments(files["out"]) >= 2, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == EXIT_STOPPED, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], stderr
        kept = _kept_judgments(files["out"])
        first = len(judge.received)
        result = run_cli(*_eval_args(files, judge, "--judge-concurrency", "2"))
        assert result.returncode == 0, result.stderr
    assert len(judge.received) - first <= 16 - kept + 2  # at most the two in flight at the stop again
    assert json.loads((files["out"] / "summary.json").read_text())["models"]["cand"]["tie"] == 8


def test_changed_judge_template_baseline_or_prompts_is_refused(files, tmp_path):
    with ScriptedJudge(scripted) as judge:
        evaluate(config(files, judge), say=lambda line: None)
        template = tmp_path / "judge.jinja"
        template.write_text("Q: {{ question }}\nA: {{ answer_a }}\nB: {{ answer_b }}\nVerdict [[A]]/[[B]]/[[C]]?")
        other_prompts = write_jsonl(tmp_path / "prompts2.jsonl", [{"id": i, "prompt": f"Other {i}?"} for i in IDS])
        for changes, fragment in ((dict(judge_model="another"), "judge.model"),
                                  (dict(judge_template=str(template)), "judge.template"),
                                  (dict(baseline=f"teacher={files['other']}"), "baseline.source"),
                                  (dict(baseline=f"ref={files['base']}"), "baseline.name"),
                                  (dict(prompts=str(other_prompts)), "prompts.digest")):
            sent = len(judge.received)
            with pytest.raises(DadpoError, match=re.escape(fragment)) as refused:
                evaluate(config(files, judge, **changes), say=lambda line: None)
            assert "--overwrite" in str(refused.value) and "\n" not in str(refused.value)
            assert len(judge.received) == sent
        summary = evaluate(config(files, judge, judge_model="another", overwrite=True), say=lambda line: None)
        assert summary["judge"]["model"] == "another" and summary["models"]["cand"]["win"] == 3
        result = run_cli(*_eval_args(files, judge, "--judge-max-new-tokens", "7"))
    assert_one_line_error(result, "judge.max_new_tokens", "--overwrite")


def test_bad_inputs_are_one_line(files, tmp_path):
    with ScriptedJudge(scripted, api_key="sekrit-key") as judge:
        unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"id": i, "response": "x"} for i in [*IDS, "zz"]])
        missing = write_jsonl(tmp_path / "missing.jsonl", [{"id": i, "response": "x"} for i in IDS[1:]])
        env = {"JUDGE_KEY": "sekrit-key"}
        key = ["--judge-api-key-env", "JUDGE_KEY"]
        args = lambda *extra: [*_eval_args(files, judge, *key), *extra]  # noqa: E731
        cases = [
            (args("--model", f"u={unknown}"), env, ["u=", "'zz'", "not in --prompts"]),
            (args("--model", f"m={missing}"), env, ["m=", "'p0'", "no response"]),
            (["eval", "--prompts", files["prompts"], "--model", f"cand={files['cand']}", "--judge-url", judge.url,
              "--judge-model", "m", "--out", files["out"]], env, ["--baseline"]),
            (["eval", "--prompts", files["prompts"], "--baseline", f"t={tmp_path / 'nope.jsonl'}", "--model",
              f"c={files['cand']}", "--judge", "answer", "--out", files["out"]], env, ["--baseline", "nope.jsonl"]),
            (args(), {"JUDGE_KEY": ""}, ["--judge-api-key-env JUDGE_KEY", "empty"]),
            (_eval_args(files, judge), env, ["--judge-url", "401", "--judge-api-key-env"]),
            ([*_eval_args(files, judge)[:9], "--judge-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "m",
              "--judge-retries", "1", "--out", files["out"]], env,
             ["--judge-url", "GET /v1/models failed", "is the server running"]),
        ]
        for command, extra_env, fragments in cases:
            result = run_cli(*command, env=extra_env)
            assert_one_line_error(result, *fragments)
        assert not judge.received  # nothing was judged by any refused run
        good = run_cli(*args(), env=env)
        assert good.returncode == 0, good.stderr
    for path in files["out"].rglob("*"):  # the key is never written
        assert not path.is_file() or b"sekrit-key" not in path.read_bytes(), path
    assert "sekrit-key" not in good.stdout + good.stderr


def test_the_judge_url_in_the_summary_carries_no_credentials():
    from dadpo.eval.judges import public_url

    assert public_url("https://user:s3cret@judge.example:8443/v1?key=abc") == "https://judge.example:8443/v1"
    assert public_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
