"""`dadpo demo` end to end (HF backend, few pairs): the pipeline runs and ends with its eval table."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from dadpo.demo import run_demo
from dadpo.eval.answer import answers_match
from dadpo.eval.report import render_table, validate_summary
from dadpo.tiny import make_tiny_prompts


def _expected_answer(question: str) -> str:
    """The task's answer worked out from the question text alone (independent of dadpo.tiny._task)."""
    if m := re.fullmatch(r"Reverse the word '(.+)'\.", question):
        return m.group(1)[::-1]
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := re.fullmatch(r"Write '(.+)' in upper case\.", question):
        return m.group(1).upper()
    if m := re.fullmatch(r"How many characters are in '(.+)'\?", question):
        return str(len(m.group(1)))
    m = re.fullmatch(r"Repeat '(.+)' twice, separated by a space\.", question)
    assert m, question
    return f"{m.group(1)} {m.group(1)}"


def test_make_tiny_prompts():
    rows = make_tiny_prompts(60, seed=1)
    assert rows == make_tiny_prompts(60, seed=1) and rows != make_tiny_prompts(60, seed=2)
    assert len({r["id"] for r in rows}) == 60
    assert {len(r) for r in rows} == {3}
    for r in rows:
        assert isinstance(r["prompt"], str) and r["answer"] == _expected_answer(r["prompt"])
    assert len({r["prompt"].split("'")[0].split(" ")[0] for r in rows}) == 5  # every kind of question appears


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(workdir, backend="hf", num_pairs=16, say=lines.append, num_prompts=8)
    return workdir, result, "\n".join(lines)


def test_demo_ends_with_the_eval_table(demo):
    workdir, result, output = demo
    summary = json.loads((workdir / "eval" / "summary.json").read_text(encoding="utf-8"))
    validate_summary(summary)
    assert summary == result["eval"]
    assert summary["baseline"] == "teacher" and summary["judge"]["kind"] == "answer"
    assert list(summary["models"]) == ["reference", "dadpo"]
    assert summary["models"]["reference"]["source"] == str(workdir / "models" / "student")
    assert summary["models"]["dadpo"]["source"] == result["train"]["model_dir"]
    assert summary["prompts"]["count"] == 8
    table = render_table(summary).rstrip("\n")
    assert output.endswith(table + "\n" + f"eval folder: {workdir / 'eval'} (summary.json, summary.md, "
                           "judgments.parquet, responses/). Done in " + output.rsplit("Done in ", 1)[1])
    assert "6. eval --judge answer" in output and "random weights" in output
    assert output.count(table) == 1  # printed once, not also by evaluate


def test_demo_eval_scores_each_models_own_responses(demo):
    workdir, result, _ = demo
    answers = {r["id"]: r["answer"] for r in make_tiny_prompts(8, seed=1)}
    responses = {name: pl.read_parquet(workdir / "eval" / "responses" / f"{name}.parquet")
                 for name in ("teacher", "reference", "dadpo")}
    for name, table in responses.items():
        assert sorted(table["id"]) == sorted(answers)
        accuracy = sum(answers_match(r, answers[i]) for i, r in zip(table["id"], table["response"])) / len(answers)
        found = result["eval"]["baseline_accuracy"] if name == "teacher" else result["eval"]["models"][name]["accuracy"]
        assert found == pytest.approx(accuracy)
    # the daDPO student answers with its trained weights, not the reference's
    assert responses["reference"]["token_ids"].to_list() != responses["dadpo"]["token_ids"].to_list()
