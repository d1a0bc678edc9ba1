"""generate -> cache-teacher -> train on templates that behave like the ones people distil from
(a think opener with reasoning stripping, a thinking switch, trim plus today's date, a reasoning-effort
variable), each checked against an independent computation of rule v2: the generation prompt rendered
and tokenized here, the sampled ids read back from the pairs file, log-probs from a plain forward pass."""

from __future__ import annotations

import datetime as dt
import json
import math

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dadpo.cache import CacheTeacherConfig, cache_teacher, open_cache
from dadpo.errors import DadpoError
from dadpo.generate import GenerateConfig, generate_pairs
from dadpo.engine import EngineOptions
from dadpo.recipes.dadpo import TrainConfig, train
from dadpo.sampling import Sampling
from dadpo.tiny import make_tiny_pairs
from support import assert_logps_close, loss_tolerance, naive_logprob, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    # name: (teacher template, teacher variables, student template or None for the tiny student, student variables)
    "think": ("think", {}, None, {}),
    "thinking_switch": ("thinking_switch", {}, "thinking_switch", {"enable_thinking": False}),
    "trim_date": ("trim_date", {}, None, {}),
    "effort": ("effort", {"reasoning_effort": "high"}, None, {}),
}
DATE = "2025-02-03"


def rendered_prompt_ids(tokenizer, prompt, variables: dict) -> list[int]:
    """Rule v2's prompt, computed independently: the template with its variables and the pinned date."""
    day = dt.datetime.fromisoformat(DATE)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         strftime_now=lambda fmt: day.strftime(fmt), **variables)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def runs(models, templated, tmp_path_factory):
    """For each case: generate (hf, sampled, short enough that some responses are cut), then cache."""
    results = {}
    for case, (teacher_template, teacher_vars, student_template, student_vars) in CASES.items():
        root = tmp_path_factory.mktemp(case)
        student = templated[student_template] if student_template else models["student"]
        prompts = write_jsonl(root / "prompts.jsonl", [{"id": row["id"], "prompt": row["prompt"]}
                                                       for row in make_tiny_pairs(8, seed=3, reasoning=True)])
        generate_pairs(GenerateConfig(
            prompts=str(prompts), teacher=str(templated[teacher_template]), student=str(student),
            out=str(root / "pairs.parquet"), backend="hf", sampling=Sampling(max_new_tokens=10, temperature=1.0, seed=1),
            teacher_template_kwargs=json.dumps(teacher_vars), student_template_kwargs=json.dumps(student_vars),
            template_date=DATE, engine=EngineOptions(batch_size=4), progress=False))
        cache_teacher(CacheTeacherConfig(
            pairs=str(root / "pairs.parquet"), teacher=[str(templated[teacher_template])], reference=str(student),
            teacher_template_kwargs=[json.dumps(teacher_vars)], reference_template_kwargs=json.dumps(student_vars),
            out=str(root / "cache"), backend="hf", dtype="float32", shard_size=4, progress=False))
        results[case] = {"root": root, "teacher": templated[teacher_template], "student": student,
                         "teacher_vars": teacher_vars, "student_vars": student_vars}
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_cached_scores_are_the_sampled_tokens_after_the_rendered_generation_prompt(runs, case):
    run = runs[case]
    pairs = pl.read_parquet(run["root"] / "pairs.parquet")
    rows = open_cache(run["root"] / "cache").read().join(pairs.select("id", "chosen_token_ids", "rejected_token_ids"),
                                                           on="id", suffix="_sampled")
    assert rows.height == pairs.height
    teacher_tok, student_tok = (AutoTokenizer.from_pretrained(run[m]) for m in ("teacher", "student"))
    teacher = AutoModelForCausalLM.from_pretrained(run["teacher"], dtype=torch.float32).eval()
    for row in rows.iter_rows(named=True):
        prompt = json.loads(row["prompt"])
        # the teacher scored its own sampled ids (stop token included, none for a cut response)
        expected_prompt = rendered_prompt_ids(teacher_tok, prompt, run["teacher_vars"])
        expected = naive_logprob(teacher, expected_prompt, row["chosen_token_ids_sampled"])
        assert_logps_close(row["teacher_logp_chosen"], expected, row["teacher_ntok_chosen"],
                           f"{case}: teacher_logp_chosen of row {row['id']}")
        assert row["teacher_ntok_chosen"] == len(row["chosen_token_ids_sampled"])
        # the reference (the student's tokenizer) holds the student's sampled ids and generation prompt
        assert row["ref_prompt_ids"] == rendered_prompt_ids(student_tok, prompt, run["student_vars"])
        assert row["ref_rejected_ids"] == row["rejected_token_ids_sampled"]
        if row["rejected_finish_reason"] == "length":
            assert row["ref_rejected_ids"][-1] not in (student_tok.eos_token_id,
                                                      student_tok.convert_tokens_to_ids("<|im_end|>"))
    assert (pairs["chosen_finish_reason"] == "length").any() or (pairs["rejected_finish_reason"] == "length").any()


def test_the_date_pinned_by_generate_is_the_cache_date(runs):
    """The cache was made today, without --template-date: it renders the generate run's date (the
    scores above were checked against prompts rendered on DATE)."""
    manifest = open_cache(runs["trim_date"]["root"] / "cache").manifest
    assert manifest["template_date"] == DATE and manifest["teachers"][""]["template_date"] == DATE
    assert manifest["reference"]["template_date"] is None  # the student's template writes no date


def test_workers_on_other_days_render_the_date_the_cache_started_with(templated, models, tmp_path):
    import time_machine

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_tiny_pairs(8, seed=4))
    common = dict(pairs=str(pairs), teacher=[str(templated["trim_date"])], reference=str(models["student"]),
                  backend="hf", dtype="float32", shard_size=4, progress=False)
    with time_machine.travel(dt.datetime(2026, 3, 1, 12, 0), tick=False):
        cache_teacher(CacheTeacherConfig(**common, out=str(tmp_path / "split"), num_workers=2, worker_index=0))
    with time_machine.travel(dt.datetime(2026, 7, 9, 12, 0), tick=False):  # another worker, months later
        cache_teacher(CacheTeacherConfig(**common, out=str(tmp_path / "split"), num_workers=2, worker_index=1))
    cache_teacher(CacheTeacherConfig(**common, out=str(tmp_path / "whole"), template_date="2026-03-01"))
    split, whole = (open_cache(tmp_path / name) for name in ("split", "whole"))
    assert split.manifest["template_date"] == "2026-03-01"
    for column in ("teacher_logp_chosen", "teacher_logp_rejected"):
        assert_logps_close(split.read()[column].to_numpy(), whole.read()[column].to_numpy(),
                           whole.read()[column.replace("_logp_", "_ntok_")].to_numpy(), f"{column}: split vs whole")


def test_sampled_ids_differ_from_re_tokenizing_the_text_somewhere(runs):
    """Why the sampled ids travel: a random model samples non-canonical tokenizations."""
    differing = 0
    for run in runs.values():
        pairs = pl.read_parquet(run["root"] / "pairs.parquet")
        tok = AutoTokenizer.from_pretrained(run["teacher"])
        for row in pairs.iter_rows(named=True):
            text = row["chosen"][0]["content"]
            ids = row["chosen_token_ids"]
            body = ids[:-1] if row["chosen_finish_reason"] == "stop" else ids
            differing += tok(text, add_special_tokens=False)["input_ids"] != body
    assert differing > 0


@pytest.mark.parametrize("case", ["think", "thinking_switch"])
def test_train_from_the_cache_starts_at_log_2(runs, case, tmp_path):
    """At step 0 the policy is the reference; with beta2 = 0 every margin is 0 and the loss is ln 2,
    which holds only if the cached reference ids and log-probs are the policy's own."""
    result = train(TrainConfig(cache=str(runs[case]["root"] / "cache"), out=str(tmp_path / "run"), beta1=0.5,
                               beta2=0.0, batch_size=2, grad_accum=1, max_steps=1, eval_fraction=0.0, lr=1e-5,
                               progress=False, start_check=0))
    rows = open_cache(runs[case]["root"] / "cache").read()
    tolerance = loss_tolerance(0.5, rows["ref_ntok_chosen"].max(), rows["ref_ntok_rejected"].max())
    assert result["final_train"]["loss"] == pytest.approx(math.log(2), abs=tolerance)


def test_a_template_that_refuses_the_conversation_is_one_line_and_writes_nothing(models, templated, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "ok", "prompt": "Hi", "chosen": "a", "rejected": "b"},
        {"id": "sys", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": "a", "rejected": "b"}])
    out = tmp_path / "cache"
    with pytest.raises(DadpoError) as error:
        cache_teacher(CacheTeacherConfig(pairs=str(pairs), teacher=[str(templated["strict_roles"])],
                                         reference=str(models["student"]), out=str(out), backend="hf", progress=False))
    message = str(error.value)
    assert "\n" not in message and "row id 'sys'" in message and "System role not supported" in message
    assert "strict_roles" in message
    assert not out.exists()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "turns", "prompt": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}])
    with pytest.raises(DadpoError, match=r"id 'turns'.*roles must alternate"):
        generate_pairs(GenerateConfig(prompts=str(prompts), teacher=str(templated["strict_roles"]),
                                      student=str(models["student"]), out=str(tmp_path / "p.parquet"), backend="hf",
                                      progress=False))
    assert not (tmp_path / "p.parquet").exists()
